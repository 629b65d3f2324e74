//! Shared by the Python-worker tests (`tests/python.rs`): the venv with aiohttp,
//! python-socketio, uvicorn and FastAPI, made on demand, and the test apps in
//! `tests/python/`. Used as `#[path = "python/support.rs"] mod python_support;`.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::support::{run, Output};

/// The repository's root.
pub fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// `<target>/python-venv`: beside the build, so `cargo clean` removes it and every
/// worktree has its own. The target directory is found from the binary under test.
pub fn venv_dir() -> PathBuf {
    let binary = Path::new(crate::common::DISPATCHER);
    binary
        .parent()
        .and_then(Path::parent)
        .expect("the dispatcher binary is in <target>/<profile>/")
        .join("python-venv")
}

/// A base Python that other uids can run too (a pyenv shim under /root is not).
pub fn system_python() -> &'static str {
    if Path::new("/usr/bin/python3").exists() {
        "/usr/bin/python3"
    } else {
        "python3"
    }
}

/// The venv's python, creating the venv and installing `tests/python/requirements.txt`
/// (pip, from the package index the machine is set up with) when missing, so that
/// `cargo test` works from a fresh clone. One installer at a time, across test threads
/// and processes; `.ci/run` prepares the same venv.
pub fn venv_python() -> PathBuf {
    let dir = venv_dir();
    let _one_install = exclusive(&std::env::temp_dir().join("sticky-dispatch-python-venv.lock"));
    let python = dir.join("bin/python");
    let requirements =
        std::fs::read_to_string(repo().join("tests/python/requirements.txt")).unwrap();
    let marker = dir.join("sticky-dispatch-requirements.txt");
    // Written after a complete install, with what was installed: a half-done or older
    // install has none or another one.
    if std::fs::read_to_string(&marker).ok().as_deref() == Some(requirements.as_str()) {
        return python;
    }
    eprintln!("{}: installing the test requirements", dir.display());
    let step = |program: &Path, args: &[&str]| -> Output {
        let mut command = Command::new(program);
        command.args(args);
        let out = run(command, Duration::from_secs(900)).unwrap_or_else(|err| panic!("{err}"));
        assert!(
            out.status.success(),
            "{} {args:?} failed ({}):\n{}\n{}",
            program.display(),
            out.status,
            out.stdout,
            out.stderr
        );
        out
    };
    if !python.exists() {
        step(
            Path::new(system_python()),
            &["-m", "venv", dir.to_str().unwrap()],
        );
    }
    let requirements_path = repo().join("tests/python/requirements.txt");
    step(
        &python,
        &[
            "-m",
            "pip",
            "install",
            "-q",
            "-r",
            requirements_path.to_str().unwrap(),
        ],
    );
    std::fs::write(&marker, requirements).unwrap();
    python
}

/// Holds an exclusive lock on `path` (created if missing) while alive.
fn exclusive(path: &Path) -> nix::fcntl::Flock<std::fs::File> {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .unwrap_or_else(|err| panic!("{}: {err}", path.display()));
    nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusive)
        .unwrap_or_else(|(_, err)| panic!("lock {}: {err}", path.display()))
}

/// The command that runs test app `app` (a file in `tests/python/`) with the venv, and
/// the environment that makes it import this working tree's `sticky_dispatch`.
pub fn app_command(app: &str) -> Vec<String> {
    vec![
        venv_python().display().to_string(),
        repo().join("tests/python").join(app).display().to_string(),
    ]
}

/// `PYTHONPATH` for the apps: the package's sources, so that the tests run the working
/// tree (CI also installs it into the venv with `pip install ./python`).
pub fn pythonpath() -> String {
    repo().join("python").display().to_string()
}

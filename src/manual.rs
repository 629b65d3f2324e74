//! The manual pages, generated from the definitions they describe so they cannot drift:
//! sticky-dispatch(8) from the command line ([`crate::cli::Cli`]) and
//! sticky-dispatch.toml(5) from the configuration keys ([`crate::config::KEYS`]).

use std::io::{self, Write};
use std::path::{Path, PathBuf};

use clap::CommandFactory;

use crate::cli::Cli;
use crate::config::{DEFAULT_CONFIG_PATH, KEYS};

/// Writes `sticky-dispatch.8` and `sticky-dispatch.toml.5` into `dir`; returns their paths.
pub fn write_pages(dir: &Path) -> io::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir)?;
    let command_page = dir.join("sticky-dispatch.8");
    let mut out = std::fs::File::create(&command_page)?;
    command(&mut out)?;
    let config_page = dir.join("sticky-dispatch.toml.5");
    let mut out = std::fs::File::create(&config_page)?;
    configuration(&mut out)?;
    Ok(vec![command_page, config_page])
}

/// sticky-dispatch(8): clap's rendering of the command line, with the sections a daemon's
/// page needs after it.
pub fn command(out: &mut impl Write) -> io::Result<()> {
    let man = clap_mangen::Man::new(Cli::command())
        .section("8")
        .manual("System Manager's Manual");
    man.render(out)?;
    writeln!(out, ".SH EXIT STATUS")?;
    writeln!(out, "0 after a clean stop; 78 (EX_CONFIG) for a configuration error or when there are no listening sockets; 1 for other failures.")?;
    writeln!(out, ".SH FILES")?;
    writeln!(
        out,
        ".TP\n{}\nThe configuration; see \\fBsticky\\-dispatch.toml\\fR(5).",
        roff(DEFAULT_CONFIG_PATH)
    )?;
    writeln!(out, ".SH SIGNALS")?;
    writeln!(out, ".TP\nSIGTERM, SIGINT\nStop accepting, finish the hand\\-offs in progress within \\fBshutdown_timeout\\fR, keep what still waits in the systemd fd store, exit.")?;
    writeln!(
        out,
        ".TP\nSIGHUP\nRe\\-read the configuration (\\fBsystemctl reload sticky\\-dispatch\\fR)."
    )?;
    writeln!(out, ".SH SEE ALSO")?;
    writeln!(
        out,
        "\\fBsticky\\-dispatch.toml\\fR(5), \\fBsystemd.socket\\fR(5), \\fBsd_notify\\fR(3)"
    )
}

/// sticky-dispatch.toml(5): every key with its default and meaning.
pub fn configuration(out: &mut impl Write) -> io::Result<()> {
    writeln!(
        out,
        ".TH STICKY\\-DISPATCH.TOML 5 \"\" \"sticky-dispatch {}\" \"File Formats Manual\"",
        env!("CARGO_PKG_VERSION")
    )?;
    writeln!(
        out,
        ".SH NAME\nsticky\\-dispatch.toml \\- configuration of the sticky\\-dispatch dispatcher"
    )?;
    writeln!(out, ".SH SYNOPSIS\n{}", roff(DEFAULT_CONFIG_PATH))?;
    writeln!(out, ".SH DESCRIPTION")?;
    writeln!(out, "A TOML file of top\\-level keys. Settings are layered, later ones winning: built\\-in defaults, this file (or the one given with \\fB\\-\\-config\\fR), environment variables \\fBSTICKY_DISPATCH_\\fR\\fIKEY\\fR (the key in upper case), command\\-line options. An unknown key or a bad value is an error naming the key and where it came from; the dispatcher then exits with status 78. \\fBsticky\\-dispatch check\\-config\\fR prints the effective settings. Each key says when a change takes effect: \\fIlive\\fR keys are applied by \\fBsystemctl reload sticky\\-dispatch\\fR (SIGHUP); \\fIrestart\\fR keys only by a restart, and a reload that changes one keeps the running value, logs a warning and shows it in the unit's status.")?;
    writeln!(out, ".SH KEYS")?;
    for key in KEYS {
        writeln!(
            out,
            ".TP\n\\fB{}\\fR (default: {}; reload: {})\n{}",
            roff(key.name),
            roff(key.default_text()),
            key.reload.as_str(),
            roff(key.doc)
        )?;
    }
    writeln!(out, ".SH SEE ALSO\n\\fBsticky\\-dispatch\\fR(8)")
}

/// Escapes text for roff: backslashes and hyphens, and a leading dot or quote.
fn roff(text: &str) -> String {
    let escaped = text
        .replace('\\', "\\e")
        .replace('-', "\\-")
        .replace('`', "");
    match escaped.chars().next() {
        Some('.') | Some('\'') => format!("\\&{escaped}"),
        _ => escaped,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_cover_every_option_and_key() {
        let mut page = Vec::new();
        command(&mut page).unwrap();
        let page = String::from_utf8(page).unwrap();
        for option in [
            "\\-\\-config",
            "\\-\\-listen",
            "\\-\\-workers",
            "\\-\\-log\\-level",
            "check\\-config",
        ] {
            assert!(
                page.contains(option),
                "{option} missing from sticky-dispatch(8)"
            );
        }
        let mut page = Vec::new();
        configuration(&mut page).unwrap();
        let page = String::from_utf8(page).unwrap();
        for key in KEYS {
            assert!(
                page.contains(&format!(
                    "\\fB{}\\fR (default: {}; reload: {})",
                    roff(key.name),
                    roff(key.default_text()),
                    key.reload.as_str()
                )),
                "{} missing",
                key.name
            );
        }
    }
}

//! The documentation against what it documents, so the two cannot drift:
//!
//! - the configuration table of docs/configuration.md is the one the code documents
//!   (`config::KEYS`), and it lives there only (the README links to it);
//! - every relative link in the README and the docs reaches an existing file, and every
//!   `#anchor` a heading of its target (sections move between files: the README keeps the
//!   front door, docs/ the reference).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use sticky_dispatch::config::KEYS;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// Where the key table lives.
const KEY_TABLE: &str = "docs/configuration.md";
const KEY_TABLE_HEADER: &str = "| key | default | reload | meaning |";

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The rows of the key table: the lines of the table under its header.
fn key_table(text: &str) -> Vec<&str> {
    text.lines()
        .skip_while(|line| *line != KEY_TABLE_HEADER)
        .skip(2) // the header and its |---| line
        .take_while(|line| line.starts_with('|'))
        .collect()
}

#[test]
fn configuration_table_matches_the_key_definitions() {
    let doc = read(&Path::new(ROOT).join(KEY_TABLE));
    assert!(
        doc.lines().any(|line| line == KEY_TABLE_HEADER),
        "{KEY_TABLE} has no key table (a line `{KEY_TABLE_HEADER}`): it moved or was deleted; \
         tests/docs.rs names where it lives"
    );
    let table = key_table(&doc);
    let expected: Vec<String> = KEYS
        .iter()
        .map(|key| {
            let default = key.default_text();
            let default = if default.chars().all(|c| c.is_alphabetic() || c == ' ') {
                default.to_owned()
            } else {
                format!("`{default}`")
            };
            format!(
                "| `{}` | {} | {} | {} |",
                key.name,
                default,
                key.reload.as_str(),
                key.doc
            )
        })
        .collect();
    assert_eq!(
        table, expected,
        "update the table of {KEY_TABLE} from config::KEYS"
    );
}

#[test]
fn the_key_table_has_one_home() {
    // A second copy (in the README, say) would drift unchecked.
    for file in markdown_files() {
        if file.ends_with(KEY_TABLE) {
            continue;
        }
        let text = read(&file);
        let rows: Vec<&str> = text
            .lines()
            .filter(|line| {
                KEYS.iter()
                    .any(|key| line.starts_with(&format!("| `{}` | ", key.name)))
            })
            .collect();
        assert!(
            rows.len() < 3,
            "{} repeats rows of the key table of {KEY_TABLE}; link to it instead: {rows:#?}",
            file.display()
        );
    }
}

/// The project's own markdown: the README, docs/, and the packages' and tools' READMEs.
fn markdown_files() -> Vec<PathBuf> {
    let root = Path::new(ROOT);
    let readmes = [
        "README.md",
        "node/README.md",
        "python/README.md",
        "packaging/README.md",
        "benches/node/README.md",
    ];
    let mut files: Vec<PathBuf> = readmes.iter().map(|f| root.join(f)).collect();
    for entry in std::fs::read_dir(root.join("docs")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "md") {
            files.push(path);
        }
    }
    files.sort();
    files
}

/// Lines outside fenced code blocks.
fn prose(text: &str) -> Vec<&str> {
    let mut fenced = false;
    text.lines()
        .filter(|line| {
            if line.trim_start().starts_with("```") {
                fenced = !fenced;
                return false;
            }
            !fenced
        })
        .collect()
}

/// The anchors GitHub gives a file's headings: lower case, punctuation dropped, spaces
/// to hyphens, `-1`, `-2`... on repeats.
fn anchors(text: &str) -> BTreeSet<String> {
    let mut seen = BTreeSet::new();
    for line in prose(text) {
        let Some(title) = line.strip_prefix('#') else {
            continue;
        };
        let title = title.trim_start_matches('#');
        if !title.starts_with(' ') {
            continue;
        }
        let slug: String = title
            .trim()
            .chars()
            .filter(|c| c.is_alphanumeric() || matches!(c, ' ' | '-' | '_'))
            .map(|c| if c == ' ' { '-' } else { c })
            .flat_map(char::to_lowercase)
            .collect();
        let mut unique = slug.clone();
        let mut n = 0;
        while seen.contains(&unique) {
            n += 1;
            unique = format!("{slug}-{n}");
        }
        seen.insert(unique);
    }
    seen
}

/// The targets of `[text](target)` links in a file's prose, without inline code.
fn links(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    for line in prose(text) {
        // Drop inline code spans, which may hold brackets that are not links.
        let mut plain = String::new();
        for (i, part) in line.split('`').enumerate() {
            if i % 2 == 0 {
                plain.push_str(part);
            }
        }
        let mut rest = plain.as_str();
        while let Some(at) = rest.find("](") {
            rest = &rest[at + 2..];
            if let Some(end) = rest.find(')') {
                out.push(rest[..end].to_owned());
                rest = &rest[end..];
            }
        }
    }
    out
}

#[test]
fn relative_links_reach_their_files_and_headings() {
    let mut broken = Vec::new();
    for file in markdown_files() {
        let text = read(&file);
        let dir = file.parent().unwrap();
        for link in links(&text) {
            if link.contains("://") || link.starts_with("mailto:") || link.contains(' ') {
                continue;
            }
            let (path, anchor) = match link.split_once('#') {
                Some((path, anchor)) => (path, Some(anchor)),
                None => (link.as_str(), None),
            };
            let target = if path.is_empty() {
                file.clone()
            } else {
                dir.join(path)
            };
            let name = file.strip_prefix(ROOT).unwrap().display().to_string();
            if !target.exists() {
                broken.push(format!("{name}: ({link}): no such file"));
                continue;
            }
            if let Some(anchor) = anchor {
                if target.extension().is_some_and(|e| e == "md")
                    && !anchors(&read(&target)).contains(anchor)
                {
                    broken.push(format!("{name}: ({link}): no such heading"));
                }
            }
        }
    }
    assert!(broken.is_empty(), "broken links:\n{}", broken.join("\n"));
}

#[test]
fn anchors_are_githubs() {
    let text = "# Title\n## The node ↔ sticky-dispatch protocol\n## Tier 1: HAProxy *(tested)*\n\
                ```sh\n# not a heading\n```\n## Node.js workers\n## Node.js workers\n";
    let got = anchors(text);
    let want: BTreeSet<String> = [
        "title",
        "the-node--sticky-dispatch-protocol",
        "tier-1-haproxy-tested",
        "nodejs-workers",
        "nodejs-workers-1",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    assert_eq!(got, want);
}

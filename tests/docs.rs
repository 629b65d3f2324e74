//! The README's configuration table is the one the code documents, so the two cannot drift.

use sticky_dispatch::config::KEYS;

#[test]
fn readme_config_table_matches_the_key_definitions() {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let table: Vec<&str> = readme
        .lines()
        .filter(|line| line.starts_with("| `") && line.contains("` | "))
        .filter(|line| {
            KEYS.iter()
                .any(|key| line.starts_with(&format!("| `{}` |", key.name)))
        })
        .collect();
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
    assert_eq!(table, expected, "update the README table from config::KEYS");
}

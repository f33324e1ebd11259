//! The daemon's module layering, checked: `ARCHITECTURE.md` lists the top-level modules of
//! `proxy/src` from the top layer down, and a module may import (`crate::…`) only modules of
//! layers below its own. A listed exception allows one upward import until it is removed;
//! an exception that no longer happens fails the check too, so the list only shrinks.
//!
//! Imports are read from the source text, not resolved: every `crate::name` path and every
//! name at the top of a `use crate::{…}` group, comments removed. That is all the crate's
//! style uses, and a miss can only let an import through, never reject a good one.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
};

use anyhow::{Context, bail};

/// The top-level modules in layers, from `ARCHITECTURE.md`.
#[derive(Debug, Default)]
struct Layering {
    /// Module → its layer (1 is the top).
    layer: BTreeMap<String, usize>,
    /// Upward imports allowed for now: (importer, imported).
    exceptions: BTreeSet<(String, String)>,
}

const SECTION: &str = "## Module layering";

/// Checks `proxy/src` against the layering in `ARCHITECTURE.md`.
pub fn check(root: &Path) -> anyhow::Result<()> {
    let doc_path = root.join("ARCHITECTURE.md");
    let doc = std::fs::read_to_string(&doc_path)
        .with_context(|| format!("reading {}", doc_path.display()))?;
    let layering = parse_layering(&doc)?;
    let src = root.join("proxy/src");
    let modules = top_level_modules(&src)?;
    let mut problems = Vec::new();
    for module in &modules {
        if !layering.layer.contains_key(module) {
            problems.push(format!(
                "`{module}` is not in the layering of ARCHITECTURE.md ({SECTION})"
            ));
        }
    }
    for listed in layering.layer.keys() {
        if !modules.contains(listed) {
            problems.push(format!(
                "`{listed}` is in the layering but proxy/src has no such module: remove it"
            ));
        }
    }
    let mut seen_exceptions = BTreeSet::new();
    for (file, module) in source_files(&src, &modules)? {
        let text = std::fs::read_to_string(&file)
            .with_context(|| format!("reading {}", file.display()))?;
        let (Some(&from), shown) = (layering.layer.get(&module), file.strip_prefix(root)) else {
            continue;
        };
        let shown = shown.unwrap_or(&file).display();
        for imported in crate_imports(&text) {
            if imported == module || !modules.contains(&imported) {
                continue;
            }
            let Some(&to) = layering.layer.get(&imported) else {
                continue;
            };
            if to > from {
                continue;
            }
            let pair = (module.clone(), imported.clone());
            if layering.exceptions.contains(&pair) {
                seen_exceptions.insert(pair);
                continue;
            }
            problems.push(format!(
                "{shown}: `{module}` (layer {from}) imports `{imported}` (layer {to}); a module \
                 may import only layers below its own"
            ));
        }
    }
    for (from, to) in layering.exceptions.difference(&seen_exceptions) {
        problems.push(format!(
            "the exception `{from}` → `{to}` no longer happens: remove it from ARCHITECTURE.md"
        ));
    }
    if !problems.is_empty() {
        bail!(
            "module layering ({SECTION} in ARCHITECTURE.md):\n  {}",
            problems.join("\n  ")
        );
    }
    Ok(())
}

/// The numbered list of the layering section (`1. \`a\`, \`b\`: why`), and its exceptions
/// (`- \`a\` → \`b\`: why`).
fn parse_layering(doc: &str) -> anyhow::Result<Layering> {
    let start = doc
        .find(SECTION)
        .with_context(|| format!("ARCHITECTURE.md has no `{SECTION}` section"))?;
    let section = &doc[start + SECTION.len()..];
    let section = &section[..section.find("\n## ").unwrap_or(section.len())];
    let mut layering = Layering::default();
    let mut layers = 0;
    for line in section.lines() {
        let line = line.trim_start();
        let head = line.split_once(':').map_or(line, |(head, _)| head);
        if let Some((number, rest)) = head.split_once(". ")
            && !number.is_empty()
            && number.bytes().all(|b| b.is_ascii_digit())
        {
            layers += 1;
            for module in backticked(rest) {
                if layering.layer.insert(module.clone(), layers).is_some() {
                    bail!("`{module}` is listed twice in the layering");
                }
            }
        } else if let Some(rest) = head.strip_prefix("- ")
            && rest.contains('→')
        {
            let names = backticked(rest);
            let [from, to] = names.as_slice() else {
                bail!("an exception names two modules, `from` → `to`: {line:?}");
            };
            layering.exceptions.insert((from.clone(), to.clone()));
        }
    }
    if layering.layer.is_empty() {
        bail!("the `{SECTION}` section lists no layers (`1. \\`module\\`: …`)");
    }
    Ok(layering)
}

fn backticked(text: &str) -> Vec<String> {
    text.split('`')
        .skip(1)
        .step_by(2)
        .map(str::to_owned)
        .collect()
}

/// `foo` for `foo.rs` and `foo/`, besides the crate roots.
fn top_level_modules(src: &Path) -> anyhow::Result<BTreeSet<String>> {
    let mut modules = BTreeSet::new();
    for entry in std::fs::read_dir(src).with_context(|| format!("reading {}", src.display()))? {
        let path = entry?.path();
        let name = path.file_stem().map(|s| s.to_string_lossy().into_owned());
        match name {
            Some(name) if path.is_dir() => {
                modules.insert(name);
            }
            Some(name)
                if path.extension().is_some_and(|e| e == "rs")
                    && name != "lib"
                    && name != "main" =>
            {
                modules.insert(name);
            }
            _ => {}
        }
    }
    Ok(modules)
}

/// Every `.rs` file below `src` with the top-level module it belongs to.
fn source_files(src: &Path, modules: &BTreeSet<String>) -> anyhow::Result<Vec<(PathBuf, String)>> {
    let mut files = Vec::new();
    let mut dirs = vec![src.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        for entry in
            std::fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))?
        {
            let path = entry?.path();
            if path.is_dir() {
                dirs.push(path);
                continue;
            }
            if path.extension().is_none_or(|e| e != "rs") {
                continue;
            }
            let Ok(relative) = path.strip_prefix(src) else {
                continue;
            };
            let first = relative.components().next().map(|c| {
                c.as_os_str()
                    .to_string_lossy()
                    .trim_end_matches(".rs")
                    .to_owned()
            });
            if let Some(module) = first.filter(|m| modules.contains(m)) {
                files.push((path, module));
            }
        }
    }
    files.sort();
    Ok(files)
}

/// The top-level names a source file reaches through `crate::`.
fn crate_imports(text: &str) -> BTreeSet<String> {
    let code: String = text
        .lines()
        .map(|line| line.find("//").map_or(line, |at| &line[..at]))
        .collect::<Vec<_>>()
        .join("\n");
    let mut names = BTreeSet::new();
    let mut rest = code.as_str();
    while let Some(at) = rest.find("crate::") {
        let macro_path = rest[..at].ends_with('$');
        rest = &rest[at + "crate::".len()..];
        if macro_path {
            continue;
        }
        if let Some(group) = rest.strip_prefix('{') {
            names.extend(group_heads(group));
        } else {
            let name: String = rest
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            if !name.is_empty() {
                names.insert(name);
            }
        }
    }
    names
}

/// The first name of each item of a `{…}` group whose opening brace was just consumed.
fn group_heads(group: &str) -> Vec<String> {
    let mut heads = Vec::new();
    let mut depth = 0;
    let mut at_item_start = true;
    let mut current = String::new();
    for c in group.chars() {
        match c {
            '{' => {
                depth += 1;
                at_item_start = false;
            }
            '}' if depth == 0 => break,
            '}' => depth -= 1,
            ',' if depth == 0 => at_item_start = true,
            c if depth == 0 && at_item_start => {
                if c.is_alphanumeric() || c == '_' {
                    current.push(c);
                } else if !current.is_empty() {
                    heads.push(std::mem::take(&mut current));
                    at_item_start = false;
                }
            }
            _ => {}
        }
    }
    if !current.is_empty() {
        heads.push(current);
    }
    heads
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_paths_and_grouped_uses_but_not_comments_or_macros() {
        let text = "use crate::{\n    bpf::{A, B},\n    config::Config,\n    net,\n};\n\
                    // crate::daemon is only mentioned\n\
                    fn f() { crate::state::count(); $crate::k8s::x(); }";
        let names: Vec<_> = crate_imports(text).into_iter().collect();
        assert_eq!(names, ["bpf", "config", "net", "state"]);
    }

    #[test]
    fn reads_layers_and_exceptions_from_the_section() {
        let doc = "# A\n## Module layering\n\nText.\n\n1. `daemon`, `ctl`: the top\n\
                   2. `proxy`: the data path\n3. `config`: data\n\n\
                   - `proxy` → `daemon`: to be removed\n## Next\n4. `ignored`: later\n";
        let layering = parse_layering(doc).unwrap();
        assert_eq!(layering.layer["ctl"], 1);
        assert_eq!(layering.layer["proxy"], 2);
        assert_eq!(layering.layer["config"], 3);
        assert!(!layering.layer.contains_key("ignored"));
        assert!(
            layering
                .exceptions
                .contains(&("proxy".to_owned(), "daemon".to_owned()))
        );
    }

    #[test]
    fn the_workspace_keeps_its_layering() {
        if let Err(e) = check(&crate::workspace_root()) {
            panic!("{e:#}");
        }
    }
}

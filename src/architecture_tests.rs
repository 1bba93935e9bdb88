//! The layering rules of src/lib.rs, checked on the source tree: only `repo` touches storage by
//! key, a job never imports another job, and no two files import each other (directly or in a
//! circle). Reads the files as text; test modules are left out.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

const JOBS: &[&str] = &["archive", "stream", "backup", "restore", "verify", "copy"];

fn src_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).expect("src is readable").flatten() {
        let p = e.path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// The file's text without its `#[cfg(test)]` modules (everything after the first one: test
/// modules sit at the end of a file in this crate).
fn non_test_source(path: &Path) -> String {
    let text = std::fs::read_to_string(path).expect("source is readable");
    let test_mod = text.match_indices("#[cfg(test)]\n").find(|(i, m)| {
        let next = text[i + m.len()..].lines().next().unwrap_or_default();
        next.contains("mod ") && next.trim_end().ends_with('{')
    });
    match test_mod {
        Some((i, _)) => text[..i].to_string(),
        None => text,
    }
}

/// Module path of a file relative to src: `repo/chunks.rs` → ["repo", "chunks"].
fn module_path(rel: &Path) -> Vec<String> {
    let mut parts: Vec<String> = rel
        .with_extension("")
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    if parts
        .last()
        .is_some_and(|l| l == "mod" || l == "lib" || l == "main")
    {
        parts.pop();
    }
    parts
}

/// The file that defines the longest existing prefix of module path `parts`.
fn resolve(files: &BTreeMap<Vec<String>, PathBuf>, parts: &[String]) -> Option<PathBuf> {
    (1..=parts.len())
        .rev()
        .find_map(|n| files.get(&parts[..n]).cloned())
}

/// Every `crate::`, `super::` and `self::` path in `src`, expanded one level into `{..}` groups.
fn referenced_paths(src: &str, here: &[String], is_mod_file: bool) -> Vec<Vec<String>> {
    let mut out = vec![];
    let bytes = src.as_bytes();
    for head in ["crate::", "super::", "self::"] {
        let mut from = 0;
        while let Some(i) = src[from..].find(head).map(|i| i + from) {
            from = i + head.len();
            if i > 0 && (bytes[i - 1].is_ascii_alphanumeric() || bytes[i - 1] == b'_') {
                continue;
            }
            let base: Vec<String> = match head {
                "crate::" => vec![],
                "super::" if is_mod_file => here[..here.len().saturating_sub(1)].to_vec(),
                "super::" => here[..here.len().saturating_sub(1)].to_vec(),
                _ => here.to_vec(),
            };
            let rest = &src[from..];
            let end = rest
                .find(|c: char| !(c.is_alphanumeric() || c == '_' || c == ':'))
                .unwrap_or(rest.len());
            let path: Vec<String> = rest[..end]
                .split("::")
                .filter(|s| !s.is_empty())
                .map(str::to_string)
                .collect();
            let full: Vec<String> = base.iter().cloned().chain(path.clone()).collect();
            out.push(full.clone());
            if rest[end..].starts_with('{') {
                let group = &rest[end + 1..rest[end..].find('}').map_or(end + 1, |j| end + j)];
                for item in group.split(',') {
                    let item: Vec<String> = item
                        .trim()
                        .split("::")
                        .map(|s| s.trim().to_string())
                        .filter(|s| !s.is_empty() && s != "self")
                        .collect();
                    out.push(full.iter().cloned().chain(item).collect());
                }
            }
        }
    }
    out
}

struct Tree {
    /// Module path → file.
    files: BTreeMap<Vec<String>, PathBuf>,
    /// File → non-test source.
    sources: BTreeMap<PathBuf, String>,
}

fn tree() -> Tree {
    let root = src_dir();
    let mut paths = vec![];
    rust_files(&root, &mut paths);
    let mut files = BTreeMap::new();
    let mut sources = BTreeMap::new();
    for p in paths {
        let rel = p.strip_prefix(&root).expect("under src").to_path_buf();
        if rel.starts_with("wal/testdata") {
            continue;
        }
        files.insert(module_path(&rel), rel.clone());
        sources.insert(rel, non_test_source(&p));
    }
    Tree { files, sources }
}

fn top(rel: &Path) -> String {
    module_path(rel).first().cloned().unwrap_or_default()
}

#[test]
fn only_repo_reaches_storage_by_key() {
    let t = tree();
    for (rel, src) in &t.sources {
        let m = top(rel);
        if JOBS.contains(&m.as_str()) || m == "cli" || m == "recovery" {
            assert!(
                !src.contains(".storage()"),
                "{} calls storage() directly: ask src/repo in domain terms",
                rel.display()
            );
        }
    }
}

#[test]
fn no_job_imports_another_job() {
    let t = tree();
    for (rel, src) in &t.sources {
        let m = top(rel);
        if !JOBS.contains(&m.as_str()) {
            continue;
        }
        for other in JOBS.iter().filter(|j| **j != m) {
            assert!(
                !src.contains(&format!("crate::{other}::"))
                    && !src.contains(&format!("crate::{other};"))
                    && !src.contains(&format!("crate::{other}}}")),
                "{} imports the {other} job: move the shared logic down a layer",
                rel.display()
            );
        }
    }
}

#[test]
fn no_import_circle_between_files() {
    let t = tree();
    let mut edges: BTreeMap<PathBuf, BTreeSet<PathBuf>> = BTreeMap::new();
    for (rel, src) in &t.sources {
        let here = module_path(rel);
        let is_mod = rel.ends_with("mod.rs");
        for path in referenced_paths(src, &here, is_mod) {
            if let Some(target) = resolve(&t.files, &path) {
                if &target != rel {
                    edges.entry(rel.clone()).or_default().insert(target);
                }
            }
        }
    }
    // A circle is a file that reaches itself.
    for start in edges.keys() {
        let mut stack = vec![(start.clone(), vec![start.clone()])];
        let mut seen = BTreeSet::new();
        while let Some((node, trail)) = stack.pop() {
            for next in edges.get(&node).into_iter().flatten() {
                if next == start {
                    let names: Vec<String> = trail
                        .iter()
                        .chain([start])
                        .map(|p| p.display().to_string())
                        .collect();
                    panic!("import circle: {}", names.join(" -> "));
                }
                if seen.insert(next.clone()) {
                    let mut t = trail.clone();
                    t.push(next.clone());
                    stack.push((next.clone(), t));
                }
            }
        }
    }
}

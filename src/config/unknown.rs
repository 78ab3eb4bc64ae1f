//! Sections and keys that the configuration does not declare are errors, each with the nearest
//! declared name when there is one close enough to be a typo, and with the variable that set it
//! when it came from the environment.

use figment::value::{Dict, Value};

use super::env::variable_for;
use super::{keys, Problem, KEYS};

/// Where each key path came from, when an environment variable set it: (path, variable).
pub type Origins = [(String, String)];

/// The variables that set `path` or anything below it.
pub fn variables_under<'a>(origins: &'a Origins, path: &str) -> Vec<&'a str> {
    origins
        .iter()
        .filter(|(p, _)| p == path || p.strip_prefix(path).is_some_and(|rest| rest.starts_with('.')))
        .map(|(_, v)| v.as_str())
        .collect()
}

/// A problem for every section and key of `dict` that `KEYS` does not declare.
pub fn unknown(dict: &Dict, origins: &Origins) -> Vec<Problem> {
    let mut problems = Vec::new();
    for (name, value) in dict {
        let Some((_, declared)) = KEYS.iter().find(|(s, _)| s == name) else {
            problems.push(unknown_section(name, origins));
            continue;
        };
        let Value::Dict(_, table) = value else {
            let message = format!("{} is not a table: write [{name}] and its keys below it", keys::shown(value));
            problems.push(Problem { key: name.clone(), message });
            continue;
        };
        for key in table.keys().filter(|k| !declared.contains(&k.as_str())) {
            problems.push(unknown_key(name, key, origins));
        }
    }
    problems
}

fn unknown_key(section: &str, key: &str, origins: &Origins) -> Problem {
    let path = format!("{section}.{key}");
    let declared = KEYS.iter().find(|(s, _)| *s == section).map_or(&[][..], |(_, k)| *k);
    // A typo within the section, or a key that belongs to another section.
    let suggestion = nearest(key, declared.iter().copied())
        .map(|k| format!("{section}.{k}"))
        .or_else(|| KEYS.iter().find_map(|(s, keys)| nearest(key, keys.iter().copied()).map(|k| format!("{s}.{k}"))));
    Problem { key: path.clone(), message: describe("unknown key", &path, suggestion, origins) }
}

fn unknown_section(name: &str, origins: &Origins) -> Problem {
    let suggestion = nearest(name, KEYS.iter().map(|(s, _)| *s))
        .map(str::to_string)
        // A key written outside its section (`addr = ...` at the top).
        .or_else(|| KEYS.iter().find(|(_, keys)| keys.contains(&name)).map(|(s, _)| format!("{s}.{name}")));
    Problem { key: name.to_string(), message: describe("unknown section", name, suggestion, origins) }
}

/// "unknown key; did you mean upstream.url?", or for a variable
/// "unknown key (set by WSKEEP_UPSTREAM__URLL); did you mean WSKEEP_UPSTREAM__URL?".
fn describe(what: &str, path: &str, suggestion: Option<String>, origins: &Origins) -> String {
    let variables = variables_under(origins, path);
    let mut message = what.to_string();
    if !variables.is_empty() {
        message.push_str(&format!(" (set by {})", variables.join(", ")));
    }
    match (suggestion, variables.first()) {
        // From the environment: the suggestion is the variable to write instead.
        (Some(better), Some(variable)) => {
            let rest = variable_path(variable, origins).and_then(|p| p.strip_prefix(path)).unwrap_or("");
            let better = if better.contains('.') || rest.is_empty() { better } else { format!("{better}{rest}") };
            message.push_str(&format!("; did you mean {}?", variable_for(&better)));
        }
        (Some(better), None) if better.contains('.') => message.push_str(&format!("; did you mean {better}?")),
        (Some(better), None) => message.push_str(&format!("; did you mean [{better}]?")),
        (None, _) => {}
    }
    message
}

fn variable_path<'a>(variable: &str, origins: &'a Origins) -> Option<&'a str> {
    origins.iter().find(|(_, v)| v == variable).map(|(p, _)| p.as_str())
}

/// The declared name closest to `word`, if close enough to be a typo of it.
fn nearest<'a>(word: &str, candidates: impl Iterator<Item = &'a str>) -> Option<&'a str> {
    let word = word.to_ascii_lowercase();
    let allowed = (word.chars().count() + 2) / 4;
    candidates
        .map(|c| (edit_distance(&word, c), c))
        .filter(|(d, _)| *d <= allowed.clamp(1, 3))
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c)
}

/// Edit distance counting an insertion, deletion, substitution or swap of neighbours as one
/// (optimal string alignment), so `lgo` is one step from `log`.
fn edit_distance(a: &str, b: &str) -> usize {
    let (a, b): (Vec<char>, Vec<char>) = (a.chars().collect(), b.chars().collect());
    let mut rows = vec![vec![0usize; b.len() + 1]; a.len() + 1];
    for (i, row) in rows.iter_mut().enumerate() {
        row[0] = i;
    }
    for (j, cell) in rows[0].iter_mut().enumerate() {
        *cell = j;
    }
    for i in 1..=a.len() {
        for j in 1..=b.len() {
            let cost = usize::from(a[i - 1] != b[j - 1]);
            let mut d = (rows[i - 1][j] + 1).min(rows[i][j - 1] + 1).min(rows[i - 1][j - 1] + cost);
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                d = d.min(rows[i - 2][j - 2] + 1);
            }
            rows[i][j] = d;
        }
    }
    rows[a.len()][b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn edit_distance_counts_swaps_as_one() {
        assert_eq!(edit_distance("lgo", "log"), 1);
        assert_eq!(edit_distance("urll", "url"), 1);
        assert_eq!(edit_distance("timout", "timeout"), 1);
        assert_eq!(edit_distance("", "abc"), 3);
        assert_eq!(edit_distance("kitten", "sitting"), 3);
    }

    #[test]
    fn suggests_only_close_names() {
        let keys = ["addr", "tls_cert", "max_connections"];
        assert_eq!(nearest("adr", keys.iter().copied()), Some("addr"));
        assert_eq!(nearest("max_conections", keys.iter().copied()), Some("max_connections"));
        assert_eq!(nearest("Addr", keys.iter().copied()), Some("addr"));
        assert_eq!(nearest("colour", keys.iter().copied()), None);
        assert_eq!(nearest("x", keys.iter().copied()), None);
    }
}

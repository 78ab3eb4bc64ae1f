//! The environment layer's names: which `WSKEEP_<SECTION>__<KEY>` variable set which key (so a
//! problem can name the variable the operator has to fix), and `WSKEEP_` variables that look
//! like configuration but are not read (one underscore where two are needed).

use std::ffi::OsString;

use super::KEYS;

pub const PREFIX: &str = "WSKEEP_";

/// Variables that are not configuration: the file name, and what Kubernetes injects for a
/// Service named wskeep (`WSKEEP_PORT`, `WSKEEP_PORT_8443_TCP_ADDR`, `WSKEEP_SERVICE_HOST`,
/// `WSKEEP_SERVICE_PORT_<NAME>` ...).
fn is_reserved(rest: &str) -> bool {
    rest == "CONFIG"
        || rest == "SERVICE_HOST"
        || ["PORT", "SERVICE_PORT"].iter().any(|p| rest == *p || rest.starts_with(&format!("{p}_")))
}

/// The configuration variables in `vars`, as (key path, variable name), read with the rules of
/// the figment provider in `Config::load`: the prefix in any case, `__` between the parts,
/// lowercased.
pub fn configuration_variables(vars: impl IntoIterator<Item = (OsString, OsString)>) -> Vec<(String, String)> {
    vars.into_iter()
        .filter_map(|(name, _)| {
            let name = name.into_string().ok()?;
            let trimmed = name.trim();
            let rest = strip_prefix(trimmed)?;
            if !rest.contains("__") {
                return None;
            }
            let path = rest.to_ascii_lowercase().replace("__", ".");
            (!path.split('.').any(str::is_empty)).then(|| (path, trimmed.to_string()))
        })
        .collect()
}

fn strip_prefix(name: &str) -> Option<&str> {
    let head = name.get(..PREFIX.len())?;
    head.eq_ignore_ascii_case(PREFIX).then(|| &name[PREFIX.len()..])
}

/// The variable that sets `section.key`, as an operator would write it.
pub fn variable_for(path: &str) -> String {
    format!("{PREFIX}{}", path.to_ascii_uppercase().replace('.', "__"))
}

/// Warnings for `WSKEEP_` variables that name a section with one underscore where two belong
/// (`WSKEEP_UPSTREAM_URL`): they are not read, and the operator should know.
pub fn misspelled_variables(vars: impl IntoIterator<Item = (OsString, OsString)>) -> Vec<String> {
    let mut warnings = Vec::new();
    for (name, _) in vars {
        let Ok(name) = name.into_string() else { continue };
        let Some(rest) = strip_prefix(name.trim()) else { continue };
        let rest = rest.to_ascii_uppercase();
        if rest.contains("__") || is_reserved(&rest) {
            continue;
        }
        let lower = rest.to_ascii_lowercase();
        // The longest section the name starts with: `upstream_keepalive_timeout` is
        // [upstream_keepalive] timeout, not [upstream] keepalive_timeout.
        let section = KEYS
            .iter()
            .filter(|(s, _)| lower == *s || lower.strip_prefix(s).is_some_and(|k| k.starts_with('_')))
            .max_by_key(|(s, _)| s.len());
        let Some((section, keys)) = section else { continue };
        let key = lower[section.len()..].trim_start_matches('_');
        let advice = if keys.contains(&key) {
            format!("write {}", variable_for(&format!("{section}.{key}")))
        } else {
            format!("write {PREFIX}{}__<KEY>", section.to_ascii_uppercase())
        };
        warnings.push(format!(
            "the environment variable {} is ignored: configuration variables separate the section and the \
             key with two underscores ({advice})",
            name.trim()
        ));
    }
    warnings
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(names: &[&str]) -> Vec<(OsString, OsString)> {
        names.iter().map(|n| (OsString::from(n), OsString::from("x"))).collect()
    }

    #[test]
    fn maps_variables_to_key_paths() {
        let found =
            configuration_variables(vars(&["WSKEEP_UPSTREAM__URLL", "wskeep_log__level", "WSKEEP_PORT", "OTHER"]));
        assert_eq!(
            found,
            [
                ("upstream.urll".to_string(), "WSKEEP_UPSTREAM__URLL".to_string()),
                ("log.level".to_string(), "wskeep_log__level".to_string())
            ]
        );
        assert_eq!(variable_for("listen.max_connections"), "WSKEEP_LISTEN__MAX_CONNECTIONS");
    }

    #[test]
    fn warns_about_one_underscore_but_not_about_kubernetes_variables() {
        let warned = misspelled_variables(vars(&[
            "WSKEEP_UPSTREAM_URL",
            "WSKEEP_UPSTREAM_KEEPALIVE_TIMEOUT",
            "WSKEEP_LOG_COLOUR",
            "WSKEEP_CONFIG",
            "WSKEEP_PORT",
            "WSKEEP_PORT_8443_TCP_ADDR",
            "WSKEEP_SERVICE_HOST",
            "WSKEEP_SERVICE_PORT",
            "WSKEEP_SERVICE_PORT_ADMIN",
            "WSKEEP_UPSTREAM__URL",
            "WSKEEP_SOMETHING_ELSE",
        ]));
        assert_eq!(warned.len(), 3, "{warned:#?}");
        assert!(
            warned[0].contains("WSKEEP_UPSTREAM_URL is ignored") && warned[0].contains("write WSKEEP_UPSTREAM__URL")
        );
        assert!(warned[1].contains("write WSKEEP_UPSTREAM_KEEPALIVE__TIMEOUT"), "{}", warned[1]);
        assert!(warned[2].contains("write WSKEEP_LOG__<KEY>"), "{}", warned[2]);
    }
}

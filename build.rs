//! Stamps the git commit into the binary (`wskeep -V`, `wskeep_build_info{commit}`) when it is
//! built from a checkout. Without git or a repository (a crates.io or `.deb` source tree, a Docker
//! build context without `.git`) the commit is empty and the build goes on, unless
//! `WSKEEP_GIT_COMMIT` names it (deploy/Dockerfile's build argument).

use std::path::Path;
use std::process::Command;

fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).output().ok()?;
    let text = String::from_utf8(out.stdout).ok()?;
    (out.status.success() && !text.trim().is_empty()).then(|| text.trim().to_string())
}

fn main() {
    let version = env!("CARGO_PKG_VERSION");
    println!("cargo:rerun-if-env-changed=WSKEEP_GIT_COMMIT");
    let given = std::env::var("WSKEEP_GIT_COMMIT").ok().filter(|c| !c.is_empty());
    let given = given.filter(|c| {
        let ok = c.len() <= 40 && c.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
        if !ok {
            println!("cargo:warning=WSKEEP_GIT_COMMIT ignored: not a commit name");
        }
        ok
    });
    let commit = if given.is_some() {
        given
    } else if Path::new(".git").exists() {
        git(&["rev-parse", "--short", "HEAD"])
    } else {
        None
    };
    if commit.is_some() {
        // `--git-path` resolves a worktree's own HEAD and the shared refs; a commit moves the
        // branch's ref (or packed-refs after `git pack-refs`), a checkout moves HEAD.
        let mut watched = vec!["HEAD".to_string(), "packed-refs".to_string()];
        if let Some(branch) = git(&["symbolic-ref", "-q", "HEAD"]) {
            watched.push(branch);
        }
        for name in watched {
            // Cargo reruns on every build for a path that does not exist: watch only real files
            // (a ref that gets packed disappears, which counts as a change).
            if let Some(path) = git(&["rev-parse", "--git-path", &name]).filter(|p| Path::new(p).is_file()) {
                println!("cargo:rerun-if-changed={path}");
            }
        }
    }
    println!("cargo:rerun-if-changed=build.rs");
    let commit = commit.unwrap_or_default();
    let long_version = if commit.is_empty() { version.to_string() } else { format!("{version} ({commit})") };
    println!("cargo:rustc-env=WSKEEP_COMMIT={commit}");
    println!("cargo:rustc-env=WSKEEP_VERSION={long_version}");
}

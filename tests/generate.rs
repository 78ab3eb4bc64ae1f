//! `wskeep generate`, the real binary: the man pages and shell completions the .deb installs,
//! written from the clap definitions, and kept out of the help and completions they describe.

use std::path::Path;
use std::process::{Command, Output};

fn wskeep(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_wskeep")).args(args).output().expect("the binary runs")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8(bytes.to_vec()).expect("UTF-8 output")
}

#[test]
fn man_pages_cover_every_subcommand_and_what_help_does_not_say() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("man");
    let run = wskeep(&["generate", "man", "--out", out.to_str().unwrap()]);
    assert!(run.status.success(), "generate man failed: {}", text(&run.stderr));

    let mut pages: Vec<String> =
        std::fs::read_dir(&out).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    pages.sort();
    let expected = [
        "wskeep-bench-echo.1",
        "wskeep-bench-idle.1",
        "wskeep-bench-latency.1",
        "wskeep-bench-throughput.1",
        "wskeep-bench.1",
        "wskeep-check.1",
        "wskeep-demo.1",
        "wskeep-probe.1",
        "wskeep-run.1",
        "wskeep.1",
    ];
    assert_eq!(pages, expected);

    let main = std::fs::read_to_string(out.join("wskeep.1")).unwrap();
    assert!(main.lines().any(|l| l.starts_with(".TH wskeep 1 ")), "not a man page:\n{main}");
    for needle in [".SH SUBCOMMANDS", "wskeep\\-check(1)", ".SH FILES", "/etc/wskeep/wskeep.toml", ".SH ENVIRONMENT"] {
        assert!(main.contains(needle), "wskeep.1 lacks {needle:?}");
    }
    assert!(!main.contains("generate"), "wskeep.1 must not offer the packaging command");
    let probe = std::fs::read_to_string(out.join("wskeep-probe.1")).unwrap();
    assert!(probe.contains("\\-\\-no\\-auto\\-pong"), "wskeep-probe.1 lacks its options");
}

#[test]
fn bash_completion_completes_subcommands_but_not_generate() {
    let run = wskeep(&["generate", "completions", "bash"]);
    assert!(run.status.success(), "generate completions failed: {}", text(&run.stderr));
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("wskeep.bash");
    std::fs::write(&script, &run.stdout).unwrap();
    // What bash offers after `wskeep <TAB>` and `wskeep pr<TAB>`.
    let complete = |word: &str| {
        let out = Command::new("bash")
            .arg("-c")
            .arg(format!(
                "source {}; COMP_WORDS=(wskeep '{word}'); COMP_CWORD=1; _wskeep wskeep '{word}' wskeep; \
                 printf '%s\\n' \"${{COMPREPLY[@]}}\"",
                script.display()
            ))
            .output()
            .expect("bash runs");
        assert!(out.status.success(), "bash: {}", text(&out.stderr));
        text(&out.stdout).split_whitespace().map(str::to_string).collect::<Vec<_>>()
    };
    let all = complete("");
    for sub in ["run", "check", "demo", "probe", "bench"] {
        assert!(all.iter().any(|w| w == sub), "`wskeep <TAB>` does not offer {sub}: {all:?}");
    }
    assert!(!all.iter().any(|w| w == "generate"), "`wskeep <TAB>` offers generate: {all:?}");
    assert_eq!(complete("pr"), ["probe"]);
}

#[test]
fn completions_are_written_under_each_shells_file_name() {
    let dir = tempfile::tempdir().unwrap();
    for (shell, file) in [("bash", "wskeep.bash"), ("zsh", "_wskeep"), ("fish", "wskeep.fish")] {
        let run = wskeep(&["generate", "completions", shell, "--out", dir.path().to_str().unwrap()]);
        assert!(run.status.success(), "generate completions {shell}: {}", text(&run.stderr));
        let script = std::fs::read_to_string(dir.path().join(file)).unwrap();
        assert!(script.contains("probe") && script.contains("json-ping"), "{file} is incomplete");
    }
}

#[test]
fn generate_stays_out_of_the_help_and_refuses_bad_input() {
    let help = wskeep(&["--help"]);
    assert!(help.status.success());
    assert!(!text(&help.stdout).contains("generate"), "--help lists generate");

    let bad = wskeep(&["generate", "completions", "tcsh"]);
    assert_eq!(bad.status.code(), Some(2), "an unknown shell is a usage error");
    assert!(text(&bad.stderr).contains("tcsh"), "the error names the value: {}", text(&bad.stderr));

    let blocked = tempfile::NamedTempFile::new().unwrap();
    let unwritable = Path::new(blocked.path()).join("man");
    let run = wskeep(&["generate", "man", "--out", unwritable.to_str().unwrap()]);
    assert_eq!(run.status.code(), Some(1));
    assert!(text(&run.stderr).contains(unwritable.to_str().unwrap()), "the error names the path");
}

//! `wskeep generate` (the binary's, not the library's, and not listed in `--help`): the man pages
//! and shell completions, written from the clap definitions so they never drift from `--help`.
//! The `.deb` build runs it (deploy/debian/build-deb.sh); `cargo install` users can too.

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::Parser;
use clap_complete::Shell;
use clap_mangen::roff::{bold, italic, roman, Roff};
use clap_mangen::Man;

#[derive(Parser)]
#[command(name = "wskeep generate", bin_name = "wskeep generate", about = "Man pages and shell completions for wskeep")]
struct GenerateCli {
    #[command(subcommand)]
    what: Generate,
}

#[derive(clap::Subcommand)]
enum Generate {
    /// Man pages: wskeep.1 and one per subcommand (wskeep-run.1, ...)
    Man {
        /// Directory to write them to (created if missing)
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
    },
    /// A shell completion script, on stdout or into DIR under the shell's file name
    Completions {
        shell: Shell,
        #[arg(long, value_name = "DIR")]
        out: Option<PathBuf>,
    },
}

const LONG_ABOUT: &str = "wskeep sits in front of a WebSocket server (the upstream), terminates \
TLS, relays messages both ways, and keeps every hop of a long-lived connection alive: it answers \
and sends protocol pings on both legs, answers the client's JSON pings, closes the other leg with \
a meaningful code when a peer dies, and exports every connection's life to Prometheus (admin \
port: /metrics /healthz /readyz /connections /drain) and to one log line.";

/// Runs `wskeep generate ...` for `cli`, the command line of `wskeep` itself.
const FILES: &[(&str, &str)] = &[
    (
        "/etc/wskeep/wskeep.toml",
        "The configuration the wskeep.service unit runs with. Unknown keys are errors; \
         \"wskeep check --config FILE\" validates a file and prints the effective configuration.",
    ),
    (
        "/etc/wskeep/tls/",
        "Where the unit's configuration expects tls.crt and tls.key when TLS is enabled; they are \
         reloaded when they change on disk.",
    ),
    (
        "/usr/share/doc/wskeep/",
        "README.md (deployment, configuration reference, operating, troubleshooting) and \
         runbooks.md (one section per alert).",
    ),
    ("/usr/share/wskeep/", "Prometheus alert rules and the Grafana dashboard."),
];

const ENVIRONMENT: &[(&str, &str)] = &[
    ("WSKEEP_CONFIG", "The configuration file when --config is not given."),
    (
        "WSKEEP_<SECTION>__<KEY>",
        "Overrides one configuration key, above the file; for example \
         WSKEEP_UPSTREAM__URL=ws://127.0.0.1:9000. Variables without the double underscore are not \
         configuration.",
    ),
];

const EXIT_STATUS: &[(&str, &str)] = &[
    ("0", "Success; for run, a drain after SIGTERM or SIGINT completed."),
    (
        "1",
        "An invalid configuration (every problem is listed with its key), a failure to start, or \
         for probe a connection that closed before --duration.",
    ),
    ("2", "A command-line usage error."),
];

pub fn main(cli: clap::Command) -> ExitCode {
    let args = GenerateCli::parse_from(std::env::args_os().skip(1));
    let result = match args.what {
        Generate::Man { out } => man_pages(cli, &out),
        Generate::Completions { shell, out } => completions(cli, shell, out.as_deref()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn man_pages(cli: clap::Command, dir: &Path) -> io::Result<()> {
    let context = |e: io::Error, what: &Path| io::Error::new(e.kind(), format!("{}: {e}", what.display()));
    fs::create_dir_all(dir).map_err(|e| context(e, dir))?;
    let mut cli = cli.long_about(LONG_ABOUT).disable_help_subcommand(true);
    // Building fills in each subcommand's display name (wskeep-run, ...), the pages' names.
    cli.build();
    let main = dir.join("wskeep.1");
    fs::write(&main, main_page(&cli)?).map_err(|e| context(e, &main))?;
    for sub in cli.get_subcommands().filter(|s| !s.is_hide_set()) {
        clap_mangen::generate_to(sub.clone(), dir).map_err(|e| context(e, dir))?;
    }
    Ok(())
}

/// The clap-rendered page plus what `--help` does not say: files, environment, exit status.
fn main_page(cli: &clap::Command) -> io::Result<Vec<u8>> {
    let man = Man::new(cli.clone());
    let mut page = Vec::new();
    man.render_title(&mut page)?;
    man.render_name_section(&mut page)?;
    man.render_synopsis_section(&mut page)?;
    man.render_description_section(&mut page)?;
    man.render_options_section(&mut page)?;
    man.render_subcommands_section(&mut page)?;
    let mut roff = Roff::new();
    section(&mut roff, "FILES", FILES);
    section(&mut roff, "ENVIRONMENT", ENVIRONMENT);
    section(&mut roff, "EXIT STATUS", EXIT_STATUS);
    roff.control("SH", ["SEE ALSO"]);
    roff.text([
        bold("systemctl"),
        roman("(1), "),
        bold("journalctl"),
        roman("(1), "),
        italic("/usr/share/doc/wskeep/README.md"),
    ]);
    roff.to_writer(&mut page)?;
    man.render_version_section(&mut page)?;
    Ok(page)
}

fn section(roff: &mut Roff, title: &str, entries: &[(&str, &str)]) {
    roff.control("SH", [title]);
    for (term, text) in entries {
        roff.control("TP", []);
        roff.text([bold(*term)]);
        roff.text([roman(*text)]);
    }
}

fn completions(mut cli: clap::Command, shell: Shell, dir: Option<&Path>) -> io::Result<()> {
    let name = cli.get_name().to_string();
    match dir {
        Some(dir) => {
            fs::create_dir_all(dir)?;
            clap_complete::generate_to(shell, &mut cli, name, dir).map(drop)
        }
        None => {
            let mut stdout = io::stdout().lock();
            clap_complete::generate(shell, &mut cli, name, &mut stdout);
            stdout.flush()
        }
    }
}

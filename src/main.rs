use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "zrelay",
    version,
    about = "Replication and HA sidecar proxy for ZEO storage servers"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy with the given configuration file.
    Run {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Validate a configuration file and exit (0 = valid).
    CheckConfig { file: PathBuf },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::CheckConfig { file } => match zrelay::config::Config::load(&file) {
            Ok(_) => {
                println!("{}: OK", file.display());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("zrelay: {e}");
                ExitCode::from(2)
            }
        },
        Command::Run { config } => {
            let cfg = match zrelay::config::Config::load(&config) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("zrelay: {e}");
                    return ExitCode::from(2);
                }
            };
            match zrelay::server::run(cfg) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("zrelay: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

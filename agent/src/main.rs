//! The `connscope` binary: parses the command line and runs a subcommand.

use anyhow::Result;
use clap::Parser as _;
use connscope::{
    agent,
    cli::{Cli, Command},
    kernel::check,
};

fn main() -> Result<()> {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("CONNSCOPE_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .init();
    match cli.command {
        Command::Run(args) => {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(agent::run(*args))
        }
        Command::Check { json, btf } => {
            let report = check::run(&btf);
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                println!("{report}");
            }
            if report.usable {
                Ok(())
            } else {
                std::process::exit(1)
            }
        }
        Command::Explain(args) => std::process::exit(connscope::explain::main(&args)),
        #[cfg(feature = "testbed")]
        Command::Demo {
            sidecar_delay_ms,
            inbound,
            app_delay_ms,
        } => connscope::demo::run(if inbound {
            connscope::demo::Direction::Inbound { app_delay_ms }
        } else {
            connscope::demo::Direction::Outbound { sidecar_delay_ms }
        }),
        #[cfg(feature = "testbed")]
        Command::Testbed(cmd) => connscope::testbed::run(cmd),
    }
}

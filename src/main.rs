use std::process::ExitCode;

use clap::Parser;

use callgate::cli::{Cli, Command};
use callgate::settings::{ProcessEnv, Settings};
use callgate::startup::Application;
use callgate::{commands, telemetry};

// glibc malloc took a sixth of the webhook path's CPU (with heap consolidation on the hot path);
// jemalloc's thread caches cost a fraction of that.
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The fixture tools read files and talk HTTP: they need no settings and no data dir.
    match cli.command {
        Command::Fixtures { command } => return exit(commands::fixtures(command)),
        Command::Replay(args) => return exit(commands::replay(args)),
        _ => {}
    }
    let settings = match Settings::load(cli.config.as_deref(), &ProcessEnv) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("callgate: {e}");
            return ExitCode::from(2);
        }
    };
    telemetry::init(&settings.log);
    let result = match cli.command {
        Command::Serve => serve(settings),
        Command::Org { command } => commands::org(&settings, command),
        Command::Keys { command } => commands::keys(&settings, command),
        Command::Upstream { command } => commands::upstream(&settings, command),
        Command::Check => commands::check(&settings),
        Command::Salvage { dry_run } => commands::salvage(&settings, dry_run),
        Command::Fixtures { .. } | Command::Replay(_) => unreachable!("handled before the settings load"),
    };
    exit(result)
}

fn exit(result: anyhow::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("callgate: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn serve(settings: Settings) -> anyhow::Result<()> {
    let (was, now) = callgate::net::fds::raise_limit();
    if was != now {
        tracing::info!(from = ?was, to = ?now, "raised the open-file limit to its hard limit");
    }
    callgate::net::fds::check_limit(now).map_err(anyhow::Error::msg)?;
    tokio::runtime::Builder::new_multi_thread().enable_all().build()?.block_on(async move {
        let app = Application::build(settings.clone()).await?;
        tracing::info!(listen = %settings.listen, port = app.port(), data_dir = %settings.data_dir.display(), "callgate listening");
        app.run_until_stopped().await
    })
}

//! The `palaver` binary: parses the command line and runs a subcommand.

use std::{io::BufRead, process::ExitCode, sync::Arc};

use clap::Parser;
use palaver::{
    clock::SystemClock,
    config::{AdminCommand, Cli, Command},
    ids::UuidIds,
    startup::{self, Application, ConfigError},
};

/// mimalloc, told to hand freed memory back at once: Argon2 takes ~19 MiB
/// per hash, which the system allocator keeps for good once a few logins ran
/// side by side, and mimalloc's own delayed purge waits for the freeing
/// thread to allocate again (the blocking pool's threads just go idle).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// `mi_option_purge_delay` of mimalloc.h (the same in its v2 and v3), which
/// libmimalloc-sys does not name.
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

#[tokio::main]
async fn main() -> ExitCode {
    // SAFETY: sets a plain integer option; mimalloc reads options on every use.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, 0) };
    let _ = dotenvy::dotenv();
    let cli = Cli::parse();
    palaver::telemetry::init(&cli.settings.server);
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.downcast_ref::<ConfigError>().is_some() => {
            eprintln!("palaver: {e}");
            ExitCode::from(2)
        }
        Err(e) => {
            eprintln!("palaver: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve => {
            raise_fd_limit();
            let app = Application::build(cli.settings).await?;
            tracing::info!(port = app.port(), addr = %app.state().settings.server.bind, "palaver is listening");
            app.run_until_stopped().await
        }
        Command::Migrate => {
            let store = startup::connect_store(&cli.settings).await?;
            store.migrate().await?;
            println!("migrations applied");
            Ok(())
        }
        Command::Openapi => {
            println!("{}", palaver::http::docs::openapi_json());
            Ok(())
        }
        Command::Admin { command: AdminCommand::Create { email, username, password_stdin: _ } } => {
            let mut password = String::new();
            std::io::stdin().lock().read_line(&mut password)?;
            let password = password.trim_end_matches(['\n', '\r']).to_owned();
            let state = startup::build_state(cli.settings, Arc::new(SystemClock), Arc::new(UuidIds)).await?;
            let user = state.accounts.create_admin(&email, username.as_deref(), password).await?;
            println!("created admin {} ({})", user.email.as_deref().unwrap_or_default(), user.id);
            Ok(())
        }
    }
}

/// Thousands of concurrent connections need more descriptors than the
/// usual soft limit of 1024; raise it to the hard limit. (The server logs
/// the limit it ends up with, and the connection cap it derives from it.)
fn raise_fd_limit() {
    if let Ok((soft, hard)) = rlimit::Resource::NOFILE.get()
        && soft < hard
        && let Err(e) = rlimit::Resource::NOFILE.set(hard, hard)
    {
        tracing::warn!(error = e.to_string().as_str(), soft, hard, "could not raise the open-file limit");
    }
}

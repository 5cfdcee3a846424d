//! The `palaver` binary: parses the command line and runs a subcommand.

use std::{io::BufRead, process::ExitCode, sync::Arc};

use clap::Parser;
use palaver::{
    clock::SystemClock,
    config::{AdminCommand, Cli, Command},
    startup::{self, Application, ConfigError},
};

#[tokio::main]
async fn main() -> ExitCode {
    let _ = dotenvy::dotenv();
    let cli = Cli::parse();
    palaver::telemetry::init(&cli.settings);
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
            tracing::info!(port = app.port(), addr = %app.state().settings.bind, "palaver is listening");
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
            let state = startup::build_state(cli.settings, Arc::new(SystemClock)).await?;
            let user = palaver::accounts::create_admin(&state, &email, username.as_deref(), password).await?;
            println!("created admin {} ({})", user.email.as_deref().unwrap_or_default(), user.id);
            Ok(())
        }
    }
}

/// Thousands of concurrent connections need more descriptors than the
/// usual soft limit of 1024; raise it to the hard limit.
fn raise_fd_limit() {
    if let Ok((soft, hard)) = rlimit::Resource::NOFILE.get()
        && soft < hard
    {
        let _ = rlimit::Resource::NOFILE.set(hard, hard);
    }
}

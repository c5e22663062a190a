//! Command-line interface: every flag, its default and its environment variable
//! (`SUPPRESSD_<FLAG_NAME>`). Secrets are only ever passed as file paths so that they do not
//! show in `ps`.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

#[derive(Debug, Parser)]
#[command(
    name = "suppressd",
    version,
    about = "Self-hosted suppression list: receives provider opt-out webhooks over HTTPS and answers \"is this number suppressed?\"",
    propagate_version = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,

    /// File with API tokens, one per line, optionally `name:token`. For `serve`: when given,
    /// every /v1/ request needs `Authorization: Bearer <token>`, and the token's name is recorded
    /// as who made a change (defaults to the systemd credential `api-token`). For the client
    /// commands: the first token is sent.
    #[arg(
        long,
        global = true,
        env = "SUPPRESSD_API_TOKEN_FILE",
        value_name = "PATH"
    )]
    pub api_token_file: Option<PathBuf>,

    /// Base URL of a running server's API, for the client commands [default:
    /// http://127.0.0.1:8080; env SUPPRESSD_API is read too if SUPPRESSD_API_URL is unset]
    #[arg(long, global = true, env = "SUPPRESSD_API_URL", value_name = "URL")]
    pub api: Option<String>,

    /// Client commands print the API's JSON instead of a sentence.
    #[arg(long, global = true, env = "SUPPRESSD_JSON")]
    pub json: bool,
}

/// Where the client commands find the API when no `--api` is given.
pub const DEFAULT_API_URL: &str = "http://127.0.0.1:8080";

impl Cli {
    /// `--api`, else `SUPPRESSD_API_URL`, else the older name `SUPPRESSD_API`, else the default.
    pub fn api_url(&self) -> String {
        self.api
            .clone()
            .or_else(|| {
                std::env::var("SUPPRESSD_API")
                    .ok()
                    .filter(|v| !v.is_empty())
            })
            .unwrap_or_else(|| DEFAULT_API_URL.to_owned())
    }
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the service: the HTTPS webhook listener and the local lookup API.
    Serve(Box<ServeArgs>),
    /// Is this subject suppressed? Exits 0 when it is safe to send, 1 when suppressed, 2 or more
    /// on error, so `suppressd check "$n" && send` reads right.
    Check {
        /// A phone number, or an account as SCOPE/ACCOUNT (split at the first `/`), e.g.
        /// `tencent:@TOA#_test_OA_for_penn/jared`.
        subject: String,
    },
    /// Suppress a subject by hand (source `manual`).
    Add {
        /// A phone number, or SCOPE/ACCOUNT.
        subject: String,
        /// Why, kept with the suppression.
        #[arg(long)]
        reason: Option<String>,
        /// A free-form note, kept in the history.
        #[arg(long)]
        note: Option<String>,
    },
    /// Write every record and its history as NDJSON to standard output.
    Export,
    /// Copy the running service's list into DIR, a new data directory, without stopping it: a
    /// fresh snapshot of everything acknowledged before the command started. Restore by starting
    /// `suppressd serve --data-dir DIR` (the database is rebuilt from the snapshot).
    Backup {
        /// A directory that does not exist yet or is empty.
        dir: PathBuf,
    },
    /// Load a file: an export (.ndjson / .jsonl) or a list of phone numbers (.csv, or one per
    /// line).
    Import {
        /// The file to load.
        file: PathBuf,
    },
    /// Write the man pages and shell completions into DIR (used to build the Debian package).
    #[command(hide = true)]
    GenerateAssets {
        /// Gets `man/*.1` and `completions/{suppressd.bash,_suppressd,suppressd.fish}`.
        dir: PathBuf,
    },
    /// Lift a suppression (e.g. the person opted back in).
    Remove {
        /// A phone number, or SCOPE/ACCOUNT.
        subject: String,
        /// Evidence of renewed consent; required when the person unsubscribed themselves.
        #[arg(long)]
        note: Option<String>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines (journald adds its own timestamps).
    Text,
    /// One JSON object per line, for log shippers.
    Json,
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Directory for the database, the self-signed certificate and all other persistent state.
    #[arg(
        long,
        env = "SUPPRESSD_DATA_DIR",
        value_name = "PATH",
        default_value = "/var/lib/suppressd"
    )]
    pub data_dir: PathBuf,

    /// Public HTTPS listener for provider webhooks.
    #[arg(
        long,
        env = "SUPPRESSD_WEBHOOK_LISTEN",
        value_name = "ADDR",
        default_value = "0.0.0.0:8443"
    )]
    pub webhook_listen: String,

    /// PEM certificate chain for the webhook listener, re-read with the key on SIGHUP. With
    /// neither --tls-cert nor --tls-key, a self-signed certificate is generated into the data
    /// directory on first start and reused.
    #[arg(long, env = "SUPPRESSD_TLS_CERT", value_name = "PATH")]
    pub tls_cert: Option<PathBuf>,

    /// PEM private key matching --tls-cert.
    #[arg(long, env = "SUPPRESSD_TLS_KEY", value_name = "PATH")]
    pub tls_key: Option<PathBuf>,

    /// Serve webhooks over plain HTTP instead of HTTPS, for running behind a proxy that
    /// terminates TLS. Never expose such a listener directly: secrets would cross the network in
    /// clear text.
    #[arg(long, env = "SUPPRESSD_INSECURE_HTTP", conflicts_with_all = ["tls_cert", "tls_key"])]
    pub insecure_http: bool,

    /// Most simultaneously open connections per listener; connections beyond it are closed as
    /// soon as they are accepted, and the ones already open keep working.
    #[arg(
        long,
        env = "SUPPRESSD_MAX_CONNECTIONS",
        value_name = "N",
        default_value_t = 1024,
        value_parser = clap::value_parser!(u32).range(1..)
    )]
    pub max_connections: u32,

    /// Seconds a client has to send a request's headers, on both listeners; also how long an
    /// idle keep-alive connection is kept open. Clients that trickle headers are cut off.
    #[arg(long, env = "SUPPRESSD_REQUEST_HEADER_TIMEOUT", value_name = "SECONDS", default_value = "10", value_parser = parse_seconds)]
    pub request_header_timeout: u64,

    /// Local lookup/admin API (plain HTTP). A non-loopback address requires --api-token-file.
    #[arg(
        long,
        env = "SUPPRESSD_API_LISTEN",
        value_name = "ADDR",
        default_value = "127.0.0.1:8080"
    )]
    pub api_listen: String,

    /// Threads that serve the local API, each with its own listening socket on --api-listen
    /// (SO_REUSEPORT) and its own connections, so that a lookup is never handed from one thread
    /// to another. 0 means half the CPU cores (at least one): the API shares the machine with
    /// the webhooks, the store's threads and often the sender's own client, and more threads
    /// than free cores only adds switching (on 2 cores with the client beside it, 1 thread
    /// answered 15 % more lookups than 2, with a third of their p99).
    #[arg(
        long,
        env = "SUPPRESSD_API_THREADS",
        value_name = "N",
        default_value_t = 0,
        value_parser = clap::value_parser!(u16).range(0..=256)
    )]
    pub api_threads: u16,

    /// File holding the shared secret LOX24 presents (Bearer, Basic password or ?token=).
    /// Enables POST /webhooks/lox24. Defaults to the systemd credential `lox24-secret`.
    #[arg(long, env = "SUPPRESSD_LOX24_SECRET_FILE", value_name = "PATH")]
    pub lox24_secret_file: Option<PathBuf>,

    /// Tencent Cloud Chat SDKAppID; enables POST /webhooks/tencent, which then requires the
    /// SdkAppid URL parameter to match.
    #[arg(long, env = "SUPPRESSD_TENCENT_SDKAPPID", value_name = "ID")]
    pub tencent_sdkappid: Option<String>,

    /// File holding the Tencent webhook token; turns on checking of the Sign and RequestTime
    /// URL parameters. Defaults to the systemd credential `tencent-token`.
    #[arg(long, env = "SUPPRESSD_TENCENT_TOKEN_FILE", value_name = "PATH")]
    pub tencent_token_file: Option<PathBuf>,

    /// Largest accepted distance between Tencent's RequestTime and this machine's clock, in
    /// seconds (older or newer signed requests are rejected as replays).
    #[arg(long, env = "SUPPRESSD_TENCENT_MAX_SKEW", value_name = "SECONDS", default_value = "60", value_parser = parse_seconds)]
    pub tencent_max_skew: u64,

    /// File holding the shared secret Sendios presents (Bearer, Basic password or ?token=).
    /// Enables POST /webhooks/sendios. Defaults to the systemd credential `sendios-secret`.
    #[arg(long, env = "SUPPRESSD_SENDIOS_SECRET_FILE", value_name = "PATH")]
    pub sendios_secret_file: Option<PathBuf>,

    /// Consecutive sms_lost events (with no sms_click between them) after which an account is
    /// suppressed as undeliverable; 0 disables.
    #[arg(
        long,
        env = "SUPPRESSD_SENDIOS_LOST_THRESHOLD",
        value_name = "N",
        default_value_t = 3
    )]
    pub sendios_lost_threshold: u32,

    /// Region (ISO 3166 alpha-2, e.g. DE) for numbers written without a country code; without
    /// it such numbers are rejected.
    #[arg(long, env = "SUPPRESSD_DEFAULT_REGION", value_name = "CC")]
    pub default_region: Option<String>,

    /// Database page cache size in MiB. sled counts on-disk bytes, so resident memory can exceed
    /// this; size MemoryMax= with headroom.
    #[arg(
        long,
        env = "SUPPRESSD_CACHE_MB",
        value_name = "MIB",
        default_value_t = 256
    )]
    pub cache_mb: u64,

    /// Memory in MiB for the answers to phone lookups asked for lately, so that a number looked
    /// up again is answered from memory; every write of a phone's record evicts its answer. 0
    /// turns it off.
    #[arg(
        long,
        env = "SUPPRESSD_LOOKUP_CACHE_MB",
        value_name = "MIB",
        default_value_t = 8
    )]
    pub lookup_cache_mb: u64,

    /// Size of one log segment file in MiB. Segments are allocated whole, so that an append
    /// syncs data only; the next one is prepared ahead, so the log needs twice this free.
    #[arg(
        long,
        env = "SUPPRESSD_LOG_SEGMENT_MB",
        value_name = "MIB",
        default_value_t = 64,
        value_parser = clap::value_parser!(u64).range(1..=1024)
    )]
    pub log_segment_mb: u64,

    /// Write a snapshot of the list once the log has grown by this many MiB since the last one
    /// (and by at least that snapshot's size, so that rewriting a large list stays proportional
    /// to what arrived). Log segments a snapshot covers are then removed, which bounds the disk
    /// the log takes.
    #[arg(
        long,
        env = "SUPPRESSD_SNAPSHOT_EVERY_MB",
        value_name = "MIB",
        default_value_t = 256,
        value_parser = clap::value_parser!(u64).range(1..)
    )]
    pub snapshot_every_mb: u64,

    /// Write a snapshot once this many events were logged since the last one (and the log since
    /// is at least as large as that snapshot).
    #[arg(
        long,
        env = "SUPPRESSD_SNAPSHOT_EVERY_EVENTS",
        value_name = "N",
        default_value_t = 1_000_000,
        value_parser = clap::value_parser!(u64).range(1..)
    )]
    pub snapshot_every_events: u64,

    /// Write a snapshot at least this often while events arrive.
    #[arg(long, env = "SUPPRESSD_SNAPSHOT_EVERY_SECONDS", value_name = "SECONDS", default_value = "3600", value_parser = parse_seconds)]
    pub snapshot_every_seconds: u64,

    /// Log line format.
    #[arg(long, env = "SUPPRESSD_LOG_FORMAT", value_name = "FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// NATS servers of a JetStream cluster (URL[,URL…]) to share the list with other nodes:
    /// every event this node accepts is also published to the stream, and every node applies
    /// the stream's events. Without it the node stands alone.
    #[arg(
        long,
        env = "SUPPRESSD_CLUSTER_NATS",
        value_name = "URL[,URL…]",
        value_delimiter = ','
    )]
    pub cluster_nats: Vec<String>,

    /// This node's name in the cluster; its durable consumer of the stream is named after it,
    /// so it must stay the same across restarts and differ between nodes. Letters, digits, `-`
    /// and `_`. Defaults to the host name.
    #[arg(long, env = "SUPPRESSD_NODE_NAME", value_name = "NAME")]
    pub node_name: Option<String>,

    /// The JetStream stream the nodes share (created if it does not exist).
    #[arg(
        long,
        env = "SUPPRESSD_CLUSTER_STREAM",
        value_name = "NAME",
        default_value = "SUPPRESSD"
    )]
    pub cluster_stream: String,

    /// Replicas of the stream when it is created (the NATS servers that must hold each event
    /// before it is acknowledged, a quorum of them).
    #[arg(
        long,
        env = "SUPPRESSD_CLUSTER_REPLICAS",
        value_name = "N",
        default_value_t = 3,
        value_parser = clap::value_parser!(u8).range(1..=5)
    )]
    pub cluster_replicas: u8,

    /// File holding the NATS credentials (a `.creds` file) or a token, read like the other
    /// secrets. Defaults to the systemd credential `cluster-creds`.
    #[arg(long, env = "SUPPRESSD_CLUSTER_CREDS_FILE", value_name = "PATH")]
    pub cluster_creds_file: Option<PathBuf>,
}

/// Man pages (one per subcommand) and bash, zsh and fish completions, generated from the same
/// definitions as `--help` so they cannot drift from it.
pub fn write_assets(dir: &std::path::Path) -> std::io::Result<()> {
    use clap::CommandFactory;
    use clap_complete::Shell;

    let man = dir.join("man");
    std::fs::create_dir_all(&man)?;
    clap_mangen::generate_to(Cli::command(), &man)?;
    let completions = dir.join("completions");
    std::fs::create_dir_all(&completions)?;
    for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
        clap_complete::generate_to(shell, &mut Cli::command(), "suppressd", &completions)?;
    }
    Ok(())
}

/// Seconds as `60` or `60s`.
fn parse_seconds(value: &str) -> Result<u64, String> {
    value
        .trim()
        .trim_end_matches('s')
        .parse()
        .map_err(|_| format!("{value:?} is not a number of seconds"))
}

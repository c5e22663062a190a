//! The client commands (`check`, `add`, `remove`, `export`, `import`): talk to a running
//! server's local API over HTTP/1.1 and print a sentence, or the API's JSON with `--json`.
//! `export` and `import` stream, and show progress on stderr when it is a terminal.
//!
//! Exit codes: `check` exits 0 when the subject is not suppressed (safe to send) and 1 when it
//! is; every command exits 2 when the request could not be made or the API refused it.

use std::process::ExitCode;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::Method;
use hyper_util::rt::TokioIo;
use percent_encoding::{utf8_percent_encode, NON_ALPHANUMERIC};
use serde_json::{json, Value};

use crate::cli::{Cli, Command};

/// Exit code for "the request could not be answered".
const FAILED: u8 = 2;

pub fn run(cli: &Cli) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("suppressd: cannot start the async runtime: {e}");
            return ExitCode::from(FAILED);
        }
    };
    match runtime.block_on(execute(cli)) {
        Ok(code) => ExitCode::from(code),
        Err(message) => {
            eprintln!("suppressd: {message}");
            ExitCode::from(FAILED)
        }
    }
}

async fn execute(cli: &Cli) -> Result<u8, String> {
    let api = Api::new(cli)?;
    let (method, subject, body) = match &cli.command {
        Command::Check { subject } => (Method::GET, subject, None),
        Command::Add {
            subject,
            reason,
            note,
        } => (
            Method::PUT,
            subject,
            Some(json!({"reason": reason, "note": note})),
        ),
        Command::Remove { subject, note } => (Method::DELETE, subject, Some(json!({"note": note}))),
        Command::Export => return export(&api).await,
        Command::Backup { dir } => return backup(&api, dir).await,
        Command::Import { file } => return import(&api, file, cli.json).await,
        Command::Serve(_) | Command::GenerateAssets { .. } => {
            return Err("not a client command".into())
        }
    };
    let record = api.call(method, &subject_path(subject), body).await?;
    if cli.json {
        println!("{record}");
    } else {
        println!("{}", describe(&record));
    }
    let suppressed = record["suppressed"].as_bool().unwrap_or(false);
    Ok(match cli.command {
        Command::Check { .. } => u8::from(suppressed),
        _ => 0,
    })
}

/// `/v1/phones/{phone}` or, for `SCOPE/ACCOUNT`, `/v1/accounts/{scope}/{account}`.
fn subject_path(subject: &str) -> String {
    let encode = |part: &str| utf8_percent_encode(part, NON_ALPHANUMERIC).to_string();
    match subject.split_once('/') {
        Some((scope, account)) => format!("/v1/accounts/{}/{}", encode(scope), encode(account)),
        None => format!("/v1/phones/{}", encode(subject)),
    }
}

/// One line for a person: the subject, its state and why.
fn describe(record: &Value) -> String {
    let subject = match (
        record["phone"].as_str(),
        record["scope"].as_str(),
        record["account"].as_str(),
    ) {
        (Some(phone), _, _) => phone.to_owned(),
        (None, Some(scope), Some(account)) => format!("{scope}/{account}"),
        _ => "subject".to_owned(),
    };
    if record["suppressed"].as_bool() != Some(true) {
        return format!("{subject}: not suppressed");
    }
    let reasons: Vec<String> = record["reasons"]
        .as_array()
        .map(|reasons| {
            reasons
                .iter()
                .map(|r| {
                    let mut reason = format!(
                        "{} {}",
                        r["source"].as_str().unwrap_or("?"),
                        r["kind"].as_str().unwrap_or("?")
                    );
                    // An operator's own words say more than "manual suppress".
                    for said in ["reason", "note"] {
                        if let Some(text) = r["details"][said].as_str() {
                            reason.push_str(&format!(" ({said}: {text})"));
                        }
                    }
                    reason
                })
                .collect()
        })
        .unwrap_or_default();
    let since = match record["since"].as_i64() {
        Some(secs) => format!("{} ({secs} Unix time)", iso8601_utc(secs)),
        None => "an unknown time".to_owned(),
    };
    format!(
        "{subject}: suppressed since {since} — {}",
        reasons.join(", ")
    )
}

/// `2026-12-06T04:06:26Z` for Unix seconds (the proleptic Gregorian calendar, days from
/// 1970-01-01 turned into a date by Howard Hinnant's `civil_from_days`).
fn iso8601_utc(secs: i64) -> String {
    let days = secs.div_euclid(86_400);
    let of_day = secs.rem_euclid(86_400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z.rem_euclid(146_097);
    let year_of_era =
        (day_of_era - day_of_era / 1_460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_index = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * month_index + 2) / 5 + 1;
    let month = if month_index < 10 {
        month_index + 3
    } else {
        month_index - 9
    };
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        of_day / 3_600,
        of_day % 3_600 / 60,
        of_day % 60
    )
}

struct Api {
    authority: String,
    prefix: String,
    token: Option<String>,
}

impl Api {
    fn new(cli: &Cli) -> Result<Api, String> {
        let url = cli.api_url();
        let rest = url.strip_prefix("http://").ok_or_else(|| {
            format!("--api {url:?} must be an http:// URL (the local API is plain HTTP)")
        })?;
        let (authority, prefix) = match rest.find('/') {
            Some(at) => (&rest[..at], rest[at..].trim_end_matches('/')),
            None => (rest, ""),
        };
        let token = match &cli.api_token_file {
            None => None,
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|e| format!("cannot read --api-token-file {}: {e}", path.display()))?;
                let line = text
                    .lines()
                    .map(str::trim)
                    .find(|l| !l.is_empty() && !l.starts_with('#'))
                    .ok_or_else(|| format!("--api-token-file {} holds no token", path.display()))?;
                Some(
                    line.split_once(':')
                        .map_or(line, |(_, token)| token.trim())
                        .to_owned(),
                )
            }
        };
        Ok(Api {
            authority: authority.to_owned(),
            prefix: prefix.to_owned(),
            token,
        })
    }

    /// Sends one request and returns the JSON answer of a 200, or the API's error as text.
    async fn call(&self, method: Method, path: &str, body: Option<Value>) -> Result<Value, String> {
        let body = Full::new(Bytes::from(body.map(|b| b.to_string()).unwrap_or_default()))
            .map_err(|never| match never {})
            .boxed();
        let response = self.send(method, path, None, body).await?;
        read_json(response).await
    }

    /// Sends one request; a non-2xx answer becomes the API's error text.
    async fn send(
        &self,
        method: Method,
        path: &str,
        content_type: Option<&'static str>,
        body: crate::response::Body,
    ) -> Result<hyper::Response<hyper::body::Incoming>, String> {
        let stream = tokio::net::TcpStream::connect(&self.authority)
            .await
            .map_err(|e| {
                format!(
                    "cannot reach the API at {}: {e} (is suppressd serve running? see --api)",
                    self.authority
                )
            })?;
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| format!("API connection failed: {e}"))?;
        tokio::spawn(connection);
        let mut request = hyper::Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.prefix))
            .header(hyper::header::HOST, &self.authority);
        if let Some(token) = &self.token {
            request = request.header(hyper::header::AUTHORIZATION, format!("Bearer {token}"));
        }
        if let Some(content_type) = content_type {
            request = request.header(hyper::header::CONTENT_TYPE, content_type);
        }
        let request = request
            .body(body)
            .map_err(|e| format!("cannot build the request: {e}"))?;
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| format!("API request failed: {e}"))?;
        if response.status().is_success() {
            return Ok(response);
        }
        let status = response.status();
        let json = read_json(response).await.unwrap_or_default();
        Err(format!(
            "the API answered {status}: {}",
            json["error"].as_str().unwrap_or("no reason given")
        ))
    }
}

async fn read_json(response: hyper::Response<hyper::body::Incoming>) -> Result<Value, String> {
    let bytes = response
        .into_body()
        .collect()
        .await
        .map_err(|e| format!("API response failed: {e}"))?
        .to_bytes();
    Ok(serde_json::from_slice(&bytes)
        .unwrap_or_else(|_| json!({"error": String::from_utf8_lossy(&bytes)})))
}

/// Shows bytes moved on stderr, when stderr is a terminal, at most a few times a second.
struct Progress {
    enabled: bool,
    verb: &'static str,
    total: Option<u64>,
    done: u64,
    shown: std::time::Instant,
}

impl Progress {
    fn new(verb: &'static str, total: Option<u64>) -> Self {
        Progress {
            enabled: std::io::IsTerminal::is_terminal(&std::io::stderr()),
            verb,
            total,
            done: 0,
            shown: std::time::Instant::now(),
        }
    }

    fn advance(&mut self, bytes: usize) {
        self.done += bytes as u64;
        if self.enabled && self.shown.elapsed() >= std::time::Duration::from_millis(200) {
            self.shown = std::time::Instant::now();
            self.show();
        }
    }

    fn show(&self) {
        let mib = self.done as f64 / 1_048_576.0;
        match self.total {
            Some(total) if total > 0 => eprint!(
                "\r{} {mib:.1} MiB ({:.0} %)",
                self.verb,
                self.done as f64 * 100.0 / total as f64
            ),
            _ => eprint!("\r{} {mib:.1} MiB", self.verb),
        }
    }

    fn finish(&self) {
        if self.enabled {
            self.show();
            eprintln!();
        }
    }
}

/// `suppressd export > file`: streams the API's export to standard output.
async fn export(api: &Api) -> Result<u8, String> {
    use std::io::Write;
    let empty = Full::new(Bytes::new())
        .map_err(|never| match never {})
        .boxed();
    let response = api.send(Method::GET, "/v1/export", None, empty).await?;
    let mut body = response.into_body();
    let mut stdout = std::io::stdout().lock();
    let mut progress = Progress::new("exported", None);
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| format!("export broke off: {e}"))?;
        if let Ok(data) = frame.into_data() {
            stdout
                .write_all(&data)
                .map_err(|e| format!("cannot write the export: {e}"))?;
            progress.advance(data.len());
        }
    }
    stdout
        .flush()
        .map_err(|e| format!("cannot write the export: {e}"))?;
    progress.finish();
    Ok(0)
}

/// `suppressd backup DIR`: receives a snapshot into DIR as a data directory of its own, checks
/// it reads back whole, and makes it durable before saying it is done.
async fn backup(api: &Api, dir: &std::path::Path) -> Result<u8, String> {
    use std::io::Write;
    let in_use = std::fs::read_dir(dir).map(|mut entries| entries.next().is_some());
    if in_use.unwrap_or(false) {
        return Err(format!(
            "{} is not empty; a backup goes into a new directory",
            dir.display()
        ));
    }
    let empty = Full::new(Bytes::new())
        .map_err(|never| match never {})
        .boxed();
    let response = api.send(Method::GET, "/v1/backup", None, empty).await?;
    let next_seq: u64 = response
        .headers()
        .get(crate::transfer::SNAPSHOT_HEADER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .ok_or("the API's answer does not say which snapshot it is")?;
    let path = crate::store::snapshot_path(dir, next_seq);
    let snapshots = path.parent().ok_or("no snapshot directory")?.to_path_buf();
    let tmp = path.with_extension("tmp");
    let failed = |what: &str, e: &dyn std::fmt::Display| format!("cannot {what}: {e}");
    std::fs::create_dir_all(&snapshots).map_err(|e| failed("create the backup directory", &e))?;
    let mut file = std::fs::File::create(&tmp).map_err(|e| failed("write the backup", &e))?;
    let mut body = response.into_body();
    let mut progress = Progress::new("backed up", None);
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| format!("the backup broke off: {e}"))?;
        if let Ok(data) = frame.into_data() {
            file.write_all(&data)
                .map_err(|e| failed("write the backup", &e))?;
            progress.advance(data.len());
        }
    }
    file.sync_all().map_err(|e| failed("sync the backup", &e))?;
    drop(file);
    progress.finish();
    let (subjects, events) = crate::store::verify_snapshot(&tmp)
        .map_err(|e| format!("the backup received does not read back whole: {e}"))?;
    std::fs::rename(&tmp, &path).map_err(|e| failed("name the backup", &e))?;
    for synced in [snapshots.as_path(), dir] {
        std::fs::File::open(synced)
            .and_then(|d| d.sync_all())
            .map_err(|e| failed("sync the backup directory", &e))?;
    }
    println!(
        "backed up {subjects} subjects ({events} events) into {}; restore with: suppressd serve --data-dir {}",
        dir.display(),
        dir.display()
    );
    Ok(0)
}

/// `suppressd import FILE`: uploads an export or a number list as it is read.
async fn import(api: &Api, file: &std::path::Path, json_output: bool) -> Result<u8, String> {
    use tokio::io::AsyncReadExt;
    let content_type = match file
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase)
        .as_deref()
    {
        Some("ndjson" | "jsonl") => "application/x-ndjson",
        Some("csv") => "text/csv",
        _ => "text/plain",
    };
    let mut reader = tokio::fs::File::open(file)
        .await
        .map_err(|e| format!("cannot read {}: {e}", file.display()))?;
    let total = reader.metadata().await.ok().map(|m| m.len());
    let (sender, receiver) = tokio::sync::mpsc::channel::<Bytes>(4);
    let path = file.display().to_string();
    let uploader = tokio::spawn(async move {
        let mut progress = Progress::new("sent", total);
        let mut buffer = vec![0u8; 256 * 1024];
        loop {
            let n = match reader.read(&mut buffer).await {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) => return Err(format!("cannot read {path}: {e}")),
            };
            progress.advance(n);
            if sender
                .send(Bytes::copy_from_slice(&buffer[..n]))
                .await
                .is_err()
            {
                break;
            }
        }
        progress.finish();
        Ok(())
    });
    let response = api
        .send(
            Method::POST,
            "/v1/import",
            Some(content_type),
            crate::response::ChannelBody(receiver).boxed(),
        )
        .await;
    uploader
        .await
        .map_err(|e| format!("upload failed: {e}"))??;
    let report = read_json(response?).await?;
    if json_output {
        println!("{report}");
    } else {
        println!(
            "added {}, already suppressed {}, invalid {}{}",
            report["added"],
            report["already"],
            report["invalid"],
            match report["invalid_lines"].as_array() {
                Some(lines) if !lines.is_empty() => format!(
                    " ({})",
                    lines
                        .iter()
                        .map(|invalid| format!(
                            "line {}: {}",
                            invalid["line"],
                            invalid["error"].as_str().unwrap_or("invalid")
                        ))
                        .collect::<Vec<_>>()
                        .join("; ")
                ),
                _ => String::new(),
            }
        );
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unix_seconds_read_as_iso_8601_utc() {
        assert_eq!(iso8601_utc(0), "1970-01-01T00:00:00Z");
        assert_eq!(iso8601_utc(1_796_477_882), "2026-12-05T13:38:02Z");
        assert_eq!(iso8601_utc(951_825_600), "2000-02-29T12:00:00Z");
        assert_eq!(iso8601_utc(-1), "1969-12-31T23:59:59Z");
    }

    #[test]
    fn subjects_map_to_api_paths() {
        assert_eq!(subject_path("+4930123456"), "/v1/phones/%2B4930123456");
        assert_eq!(
            subject_path("tencent:@TOA#x/jared"),
            "/v1/accounts/tencent%3A%40TOA%23x/jared"
        );
    }
}

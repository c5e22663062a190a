//! A light load generator for bulk checks, run by `benches/compare.sh`: it sends pre-encoded
//! requests and counts hits in the raw reply bytes, doing for suppressd what redis-benchmark does
//! for Redis, so that neither side is measured through a heavy client.
//!
//! ```text
//! cargo bench --bench bulk_client -- suppressd-json ADDR COUNT SECONDS   # POST /v1/check, 10,000 a request
//! cargo bench --bench bulk_client -- suppressd-text ADDR COUNT SECONDS   # text/plain streams of 1,000,000 lines
//! cargo bench --bench bulk_client -- redis ADDR COUNT SECONDS            # SMISMEMBER, 1,000 a command, 64 in flight
//! ```
//!
//! COUNT numbers were loaded as suppressed: `+49` and twelve digits `0 .. COUNT` (Redis holds
//! the twelve digits in the set `suppressed`); the numbers asked for are drawn from
//! `0 .. 2 × COUNT`, so about half are hits. Prints one line:
//! `numbers/s=… hits=… numbers=… seconds=…`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

const JSON_BATCH: usize = 10_000;
const TEXT_BATCH: usize = 1_000_000;
const REDIS_BATCH: usize = 1_000;
const REDIS_IN_FLIGHT: usize = 64;
/// Distinct request bodies, cycled, so that the client spends nothing on making them.
const BODIES: usize = 16;

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    let [mode, addr, count, seconds] = args.as_slice() else {
        panic!("usage: bulk_client suppressd-json|suppressd-text|redis ADDR COUNT SECONDS");
    };
    let count: u64 = count.parse().expect("COUNT");
    let duration = Duration::from_secs(seconds.parse().expect("SECONDS"));
    let mut numbers = Numbers(0x9E37_79B9_7F4A_7C15, 2 * count);
    let (checked, hits, elapsed) = match mode.as_str() {
        "suppressd-json" => suppressd_json(addr, &mut numbers, duration),
        "suppressd-text" => suppressd_text(addr, &mut numbers, duration),
        "redis" => redis(addr, &mut numbers, duration),
        other => panic!("unknown mode {other}"),
    };
    let secs = elapsed.as_secs_f64();
    println!(
        "numbers/s={:.0} hits={hits} numbers={checked} seconds={secs:.1}",
        checked as f64 / secs
    );
}

/// A xorshift stream of numbers below a bound: no allocation, no dependency.
struct Numbers(u64, u64);

impl Numbers {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % self.1
    }
}

fn suppressd_json(addr: &str, numbers: &mut Numbers, duration: Duration) -> (u64, u64, Duration) {
    let requests: Vec<Vec<u8>> = (0..BODIES)
        .map(|_| {
            let list: Vec<String> = (0..JSON_BATCH)
                .map(|_| format!("\"+49{:012}\"", numbers.next()))
                .collect();
            let body = format!("{{\"phones\":[{}]}}", list.join(","));
            http_post(addr, "application/json", &body, false)
        })
        .collect();
    let mut stream = TcpStream::connect(addr).expect("connect");
    stream.set_nodelay(true).unwrap();
    let mut reader = BufReader::with_capacity(1 << 20, stream.try_clone().unwrap());
    let needle = b"\"suppressed\":true";
    let (mut checked, mut hits) = (0u64, 0u64);
    let started = Instant::now();
    let mut i = 0;
    while started.elapsed() < duration {
        stream.write_all(&requests[i % BODIES]).unwrap();
        let body = read_response(&mut reader);
        hits += count(&body, needle);
        checked += JSON_BATCH as u64;
        i += 1;
    }
    (checked, hits, started.elapsed())
}

fn suppressd_text(addr: &str, numbers: &mut Numbers, duration: Duration) -> (u64, u64, Duration) {
    let requests: Vec<Vec<u8>> = (0..2)
        .map(|_| {
            let mut body = String::with_capacity(TEXT_BATCH * 16);
            for _ in 0..TEXT_BATCH {
                body.push_str(&format!("+49{:012}\n", numbers.next()));
            }
            http_post(addr, "text/plain", &body, true)
        })
        .collect();
    let needle = b"\"suppressed\":true";
    let (mut checked, mut hits) = (0u64, 0u64);
    let started = Instant::now();
    let mut i = 0;
    while started.elapsed() < duration {
        // One stream a connection: the answer streams back while the list is still uploading,
        // so the upload goes on a thread of its own and the reply is read to the close.
        let mut stream = TcpStream::connect(addr).expect("connect");
        let mut writer = stream.try_clone().unwrap();
        let request = requests[i % 2].clone();
        let upload = std::thread::spawn(move || writer.write_all(&request).unwrap());
        let mut buffer = vec![0u8; 1 << 20];
        let mut carry: Vec<u8> = Vec::new();
        loop {
            let n = stream.read(&mut buffer).unwrap();
            if n == 0 {
                break;
            }
            // A hit split across two reads is counted once the next read completes it.
            carry.extend_from_slice(&buffer[..n]);
            hits += count(&carry, needle);
            let keep = carry.len().saturating_sub(needle.len() - 1);
            carry.drain(..keep);
        }
        upload.join().unwrap();
        checked += TEXT_BATCH as u64;
        i += 1;
    }
    (checked, hits, started.elapsed())
}

fn redis(addr: &str, numbers: &mut Numbers, duration: Duration) -> (u64, u64, Duration) {
    let commands: Vec<Vec<u8>> = (0..BODIES)
        .map(|_| {
            let mut command = format!(
                "*{}\r\n$10\r\nSMISMEMBER\r\n$10\r\nsuppressed\r\n",
                REDIS_BATCH + 2
            );
            for _ in 0..REDIS_BATCH {
                command.push_str(&format!("$12\r\n{:012}\r\n", numbers.next()));
            }
            command.into_bytes()
        })
        .collect();
    let mut stream = TcpStream::connect(addr).expect("connect");
    stream.set_nodelay(true).unwrap();
    let mut reader = BufReader::with_capacity(1 << 20, stream.try_clone().unwrap());
    let (mut checked, mut hits) = (0u64, 0u64);
    let mut line = Vec::new();
    let mut sent = 0usize;
    let mut answered = 0usize;
    let started = Instant::now();
    // Keeps REDIS_IN_FLIGHT commands outstanding: one more goes out as each reply comes in.
    for _ in 0..REDIS_IN_FLIGHT {
        stream.write_all(&commands[sent % BODIES]).unwrap();
        sent += 1;
    }
    loop {
        line.clear();
        reader.read_until(b'\n', &mut line).unwrap();
        assert!(
            line.starts_with(b"*"),
            "unexpected reply {:?}",
            String::from_utf8_lossy(&line)
        );
        for _ in 0..REDIS_BATCH {
            line.clear();
            reader.read_until(b'\n', &mut line).unwrap();
            hits += u64::from(line.as_slice() == b":1\r\n");
        }
        answered += 1;
        checked += REDIS_BATCH as u64;
        if started.elapsed() < duration {
            stream.write_all(&commands[sent % BODIES]).unwrap();
            sent += 1;
        } else if answered == sent {
            break;
        }
    }
    (checked, hits, started.elapsed())
}

fn http_post(addr: &str, content_type: &str, body: &str, close: bool) -> Vec<u8> {
    let connection = if close { "close" } else { "keep-alive" };
    let mut request = format!(
        "POST /v1/check HTTP/1.1\r\nhost: {addr}\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\nconnection: {connection}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    request.extend_from_slice(body.as_bytes());
    request
}

/// Reads one response with a `content-length` body and returns the body.
fn read_response(reader: &mut BufReader<TcpStream>) -> Vec<u8> {
    let mut line = String::new();
    let mut length = None;
    reader.read_line(&mut line).unwrap();
    assert!(
        line.starts_with("HTTP/1.1 200"),
        "unexpected answer {line:?}"
    );
    loop {
        line.clear();
        reader.read_line(&mut line).unwrap();
        if line == "\r\n" {
            break;
        }
        if let Some((name, value)) = line.split_once(':') {
            if name.eq_ignore_ascii_case("content-length") {
                length = Some(value.trim().parse::<usize>().unwrap());
            }
        }
    }
    let mut body = vec![0u8; length.expect("a content-length body")];
    reader.read_exact(&mut body).unwrap();
    body
}

fn count(haystack: &[u8], needle: &[u8]) -> u64 {
    memchr::memmem::find_iter(haystack, needle).count() as u64
}

//! Lifecycle hooks: commands and HTTP calls the gateway rendered for an
//! instance, run by the node at provision, deprovision, bind and unbind
//! (e.g. a Redis `ACL SETUSER` through `redis-cli`, or an Elasticsearch index
//! created by `PUT`, as the Stackato Elasticsearch plugin did).
//!
//! Hooks carry secrets in env, stdin, headers, bodies and URL userinfo. None
//! of those is ever logged; errors name a command by its program only and
//! an HTTP call by method and URL without userinfo or query. The caller does
//! get a command's stderr tail or a response's first bytes, since without
//! them a failure cannot be diagnosed.

use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use reqwest::header::{HeaderMap, HeaderName, HeaderValue};
use svcbroker_proto::v1 as pb;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::error::Error;
use crate::procfs;

/// Timeout of a hook whose request gives 0.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
/// Lines of a failed command's stderr returned to the caller.
const TAIL_LINES: usize = 20;
/// Bytes of stderr kept while a command runs (the tail is cut from these).
const TAIL_KEEP: usize = 8192;
/// Bytes of a failed HTTP call's response body returned to the caller.
const BODY_BYTES: usize = 500;
/// How long stderr may stay open after the command exited (a background
/// child still holding it is killed with the group first).
const STDERR_GRACE: Duration = Duration::from_secs(1);

/// A validated hook.
#[derive(Clone)]
pub(crate) enum Hook {
    /// A command run on the node.
    Command(CommandHook),
    /// An HTTP call made by the node (boxed: much larger than a command).
    Http(Box<HttpHook>),
}

/// A validated command hook.
#[derive(Clone)]
pub(crate) struct CommandHook {
    argv: Vec<String>,
    env: Vec<(String, String)>,
    stdin: String,
    timeout: Duration,
}

/// A validated HTTP hook.
#[derive(Clone)]
pub(crate) struct HttpHook {
    method: reqwest::Method,
    url: reqwest::Url,
    /// Method and URL without userinfo, query or fragment: what logs and
    /// errors show.
    shown: String,
    headers: HeaderMap,
    body: String,
    timeout: Duration,
    accept: Vec<u16>,
}

// Hand-written so that env values, stdin, headers and bodies never reach a
// log line through `{:?}`.
impl fmt::Debug for Hook {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Hook::Command(c) => f
                .debug_struct("CommandHook")
                .field("program", &c.argv[0])
                .field("args", &(c.argv.len() - 1))
                .field("env", &c.env.iter().map(|(k, _)| k).collect::<Vec<_>>())
                .field("stdin_bytes", &c.stdin.len())
                .field("timeout", &c.timeout)
                .finish(),
            Hook::Http(h) => f
                .debug_struct("HttpHook")
                .field("call", &h.shown)
                .field("headers", &h.headers.keys().collect::<Vec<_>>())
                .field("body_bytes", &h.body.len())
                .field("timeout", &h.timeout)
                .field("accept", &h.accept)
                .finish(),
        }
    }
}

impl Hook {
    /// What logs and errors call this hook.
    pub fn describe(&self) -> String {
        match self {
            Hook::Command(c) => format!("command {}", c.argv[0]),
            Hook::Http(h) => h.shown.clone(),
        }
    }
}

fn timeout_of(ms: u32) -> Duration {
    if ms == 0 {
        DEFAULT_TIMEOUT
    } else {
        Duration::from_millis(u64::from(ms))
    }
}

/// Validates the hooks of a request (`field` names them in errors, e.g.
/// "hooks"). Messages never quote values that may be secret.
pub(crate) fn validate(field: &str, hooks: Vec<pb::Hook>) -> Result<Vec<Hook>, Error> {
    hooks
        .into_iter()
        .enumerate()
        .map(|(i, h)| {
            let at = format!("{field}[{i}]");
            match h.action {
                Some(pb::hook::Action::Command(c)) => validate_command(&at, c).map(Hook::Command),
                Some(pb::hook::Action::Http(h)) => {
                    validate_http(&at, h).map(|h| Hook::Http(Box::new(h)))
                }
                None => Err(Error::InvalidArgument(format!(
                    "{at} has neither command nor http"
                ))),
            }
        })
        .collect()
}

fn validate_command(at: &str, c: pb::CommandHook) -> Result<CommandHook, Error> {
    if c.argv.is_empty() || c.argv[0].is_empty() {
        return Err(Error::InvalidArgument(format!(
            "{at}.command.argv must name a program"
        )));
    }
    if c.argv.iter().any(|a| a.contains('\0')) {
        return Err(Error::InvalidArgument(format!(
            "{at}.command.argv must not contain NUL bytes"
        )));
    }
    let mut env: Vec<(String, String)> = c.env.into_iter().collect();
    for (k, v) in &env {
        if k.is_empty() || k.contains('=') || k.contains('\0') || v.contains('\0') {
            return Err(Error::InvalidArgument(format!(
                "{at}.command.env name {:?} must be non-empty without '=' or NUL, value without NUL",
                k.chars().take(64).collect::<String>()
            )));
        }
    }
    env.sort();
    Ok(CommandHook {
        argv: c.argv,
        env,
        stdin: c.stdin,
        timeout: timeout_of(c.timeout_ms),
    })
}

fn validate_http(at: &str, h: pb::HttpHook) -> Result<HttpHook, Error> {
    let bad = |what: String| Error::InvalidArgument(format!("{at}.http.{what}"));
    let method = reqwest::Method::from_bytes(h.method.to_ascii_uppercase().as_bytes())
        .ok()
        .filter(|_| !h.method.is_empty())
        .ok_or_else(|| {
            bad(format!(
                "method {:?} is not an HTTP method",
                h.method.chars().take(64).collect::<String>()
            ))
        })?;
    // The URL is never quoted: its userinfo may hold a password.
    let url = reqwest::Url::parse(&h.url).map_err(|e| bad(format!("url does not parse: {e}")))?;
    match url.scheme() {
        "http" => {}
        // The node is built without TLS (reqwest without a TLS backend), so
        // an https URL would fail at call time; say so at validation.
        "https" => return Err(bad("url: https is not supported by this node".to_owned())),
        other => return Err(bad(format!("url scheme {other:?} is not http"))),
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(bad("url has no host".to_owned()));
    }
    let mut headers = HeaderMap::new();
    for (k, v) in h.headers {
        let name = HeaderName::from_bytes(k.as_bytes()).map_err(|_| {
            bad(format!(
                "headers: {:?} is not a header name",
                k.chars().take(64).collect::<String>()
            ))
        })?;
        let value = HeaderValue::from_str(&v).map_err(|_| {
            bad(format!(
                "headers: value of {:?} is not a valid header value",
                k.chars().take(64).collect::<String>()
            ))
        })?;
        headers.insert(name, value);
    }
    let mut accept = Vec::with_capacity(h.accept_status.len());
    for s in h.accept_status {
        if !(100..=599).contains(&s) {
            return Err(bad(format!("accept_status {s} is not an HTTP status")));
        }
        accept.push(s as u16);
    }
    let shown = format!("{method} {}", shown_url(&url));
    Ok(HttpHook {
        method,
        url,
        shown,
        headers,
        body: h.body,
        timeout: timeout_of(h.timeout_ms),
        accept,
    })
}

/// `url` without userinfo (a password), query and fragment (tokens).
fn shown_url(url: &reqwest::Url) -> String {
    let mut u = url.clone();
    let _ = u.set_username("");
    let _ = u.set_password(None);
    u.set_query(None);
    u.set_fragment(None);
    u.to_string()
}

/// Why one hook failed.
struct Failure {
    reason: String,
    detail: String,
    transient: bool,
}

/// Runs hooks; holds the HTTP client (a connection pool) for all of them.
pub(crate) struct HookRunner {
    http: reqwest::Client,
}

impl HookRunner {
    /// A runner whose HTTP client follows no redirects and uses no proxy:
    /// a hook is one exact call to a server the node manages, and neither a
    /// redirect nor a proxy from the environment should send its body (or
    /// the URL's credentials) anywhere else.
    pub fn new() -> Self {
        let http = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .build()
            .expect("reqwest client without TLS builds");
        HookRunner { http }
    }

    /// Runs `hooks` in order and stops at the first failure.
    pub async fn run_all(
        &self,
        phase: &'static str,
        instance_id: &str,
        hooks: &[Hook],
    ) -> Result<(), Error> {
        for (i, hook) in hooks.iter().enumerate() {
            let started = Instant::now();
            let result = match hook {
                Hook::Command(c) => run_command(c).await,
                Hook::Http(h) => self.run_http(h).await,
            };
            let elapsed_ms = started.elapsed().as_millis() as u64;
            match result {
                Ok(()) => tracing::info!(
                    instance_id,
                    phase,
                    hook = %hook.describe(),
                    elapsed_ms,
                    "hook succeeded"
                ),
                Err(f) => {
                    let err = Error::HookFailed {
                        phase,
                        index: i + 1,
                        count: hooks.len(),
                        what: hook.describe(),
                        reason: f.reason,
                        detail: f.detail,
                        transient: f.transient,
                    };
                    tracing::warn!(instance_id, elapsed_ms, error = %err.summary(), "hook failed");
                    return Err(err);
                }
            }
        }
        Ok(())
    }

    async fn run_http(&self, h: &HttpHook) -> Result<(), Failure> {
        let mut req = self
            .http
            .request(h.method.clone(), h.url.clone())
            .headers(h.headers.clone())
            .timeout(h.timeout);
        if !h.body.is_empty() {
            req = req.body(h.body.clone());
        }
        let resp = req.send().await.map_err(|e| Failure {
            reason: if e.is_timeout() {
                format!("timed out after {} ms", h.timeout.as_millis())
            } else {
                format!("failed: {}", reqwest_message(e))
            },
            detail: String::new(),
            // Unreachable or slow: the server may be restarting.
            transient: true,
        })?;
        let status = resp.status();
        if status.is_success() || h.accept.contains(&status.as_u16()) {
            return Ok(());
        }
        let detail = first_bytes(resp, BODY_BYTES).await;
        Err(Failure {
            reason: format!("answered {status}"),
            detail,
            transient: status.is_server_error() || status.as_u16() == 429,
        })
    }
}

/// A transport error's message with its causes, without the URL reqwest
/// would otherwise print (it may carry userinfo).
fn reqwest_message(e: reqwest::Error) -> String {
    let e = e.without_url();
    let mut msg = e.to_string();
    let mut source = std::error::Error::source(&e);
    while let Some(s) = source {
        msg.push_str(": ");
        msg.push_str(&s.to_string());
        source = s.source();
    }
    msg
}

/// Reads at most `max` bytes of the body, as lossy UTF-8.
async fn first_bytes(mut resp: reqwest::Response, max: usize) -> String {
    let mut buf: Vec<u8> = Vec::new();
    while buf.len() < max {
        match resp.chunk().await {
            Ok(Some(chunk)) => buf.extend_from_slice(&chunk),
            _ => break,
        }
    }
    buf.truncate(max);
    String::from_utf8_lossy(&buf).trim_end().to_owned()
}

async fn run_command(c: &CommandHook) -> Result<(), Failure> {
    let mut cmd = tokio::process::Command::new(&c.argv[0]);
    cmd.args(&c.argv[1..])
        .stdin(std::process::Stdio::piped())
        // Discarded: it may echo secrets and nothing reads it.
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        // Its own group, so that a timeout kills whatever it started too.
        .process_group(0)
        .kill_on_drop(true);
    crate::process::scrub_node_env(cmd.as_std_mut());
    cmd.envs(c.env.iter().map(|(k, v)| (k, v)));
    let mut child = cmd.spawn().map_err(|e| Failure {
        reason: format!("cannot be started: {e}"),
        detail: String::new(),
        transient: false,
    })?;
    let pgid = child.id().map(|p| p as i32).unwrap_or(0);

    // stdin is written and stderr read on their own tasks, so that neither
    // a program that reads no input nor one that writes much output can
    // block the other.
    let mut stdin = child.stdin.take();
    let input = c.stdin.clone().into_bytes();
    let writer = tokio::spawn(async move {
        if let Some(s) = stdin.as_mut() {
            // A program that exits without reading closes the pipe: not an
            // error of the hook, its exit status tells.
            let _ = s.write_all(&input).await;
            let _ = s.shutdown().await;
        }
        drop(stdin);
    });
    let tail = Arc::new(Mutex::new(Vec::<u8>::new()));
    let reader = child.stderr.take().map(|mut err| {
        let tail = tail.clone();
        tokio::spawn(async move {
            let mut chunk = [0u8; 4096];
            while let Ok(n) = err.read(&mut chunk).await {
                if n == 0 {
                    break;
                }
                let mut t = tail.lock().unwrap();
                t.extend_from_slice(&chunk[..n]);
                if t.len() > TAIL_KEEP {
                    let cut = t.len() - TAIL_KEEP;
                    t.drain(..cut);
                }
            }
        })
    });

    let waited = tokio::time::timeout(c.timeout, child.wait()).await;
    // Whatever is left in the group (background children, or everything
    // on a timeout) is killed: a hook is a one-shot action, and a leftover
    // would hold stderr open and run unsupervised.
    procfs::signal_group(pgid, Signal::SIGKILL);
    let status = match waited {
        Ok(s) => s,
        Err(_) => {
            let _ = child.wait().await;
            writer.abort();
            if let Some(r) = reader {
                r.abort();
            }
            return Err(Failure {
                reason: format!("timed out after {} ms", c.timeout.as_millis()),
                detail: tail_lines(&tail.lock().unwrap()),
                transient: true,
            });
        }
    };
    writer.abort();
    if let Some(r) = reader {
        let _ = tokio::time::timeout(STDERR_GRACE, r).await;
    }
    match status {
        Ok(s) if s.success() => Ok(()),
        Ok(s) => Err(Failure {
            reason: format!("exited with {s}"),
            detail: tail_lines(&tail.lock().unwrap()),
            transient: false,
        }),
        Err(e) => Err(Failure {
            reason: format!("cannot be waited for: {e}"),
            detail: String::new(),
            transient: false,
        }),
    }
}

/// The last [`TAIL_LINES`] lines of `bytes`, as lossy UTF-8.
fn tail_lines(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    let lines: Vec<&str> = text.trim_end().lines().collect();
    let start = lines.len().saturating_sub(TAIL_LINES);
    let tail = lines[start..].join("\n");
    if tail.is_empty() {
        tail
    } else {
        format!("stderr:\n{tail}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn cmd(argv: &[&str], stdin: &str, timeout_ms: u32) -> pb::Hook {
        pb::Hook {
            action: Some(pb::hook::Action::Command(pb::CommandHook {
                argv: argv.iter().map(|s| s.to_string()).collect(),
                env: HashMap::from([("SECRET".to_owned(), "hunter2".to_owned())]),
                stdin: stdin.to_owned(),
                timeout_ms,
            })),
        }
    }

    fn http(method: &str, url: &str) -> pb::Hook {
        pb::Hook {
            action: Some(pb::hook::Action::Http(pb::HttpHook {
                method: method.into(),
                url: url.into(),
                headers: HashMap::from([("Authorization".into(), "Bearer hunter2".into())]),
                body: "hunter2".into(),
                ..Default::default()
            })),
        }
    }

    #[test]
    fn validation() {
        assert!(validate("hooks", vec![cmd(&["true"], "", 0)]).is_ok());
        for bad in [
            cmd(&[], "", 0),
            cmd(&[""], "", 0),
            http("PUT", "https://h/x"),
            http("PUT", "ftp://h/x"),
            http("", "http://h/x"),
            http("PU T", "http://h/x"),
            http("PUT", "not a url"),
            pb::Hook { action: None },
        ] {
            assert!(validate("hooks", vec![bad.clone()]).is_err(), "{bad:?}");
        }
        let err = validate("hooks", vec![http("PUT", "http://u:hunter2@[::1")])
            .unwrap_err()
            .to_string();
        assert!(!err.contains("hunter2"), "{err}");
    }

    #[test]
    fn debug_and_describe_hide_secrets() {
        let hooks = validate(
            "hooks",
            vec![
                cmd(&["redis-cli", "-p", "1"], "ACL SETUSER u >hunter2", 0),
                http(
                    "put",
                    "http://elastic:hunter2@127.0.0.1:9200/idx?token=hunter2#f",
                ),
            ],
        )
        .unwrap();
        for h in &hooks {
            let shown = format!("{h:?} {}", h.describe());
            assert!(!shown.contains("hunter2"), "{shown}");
        }
        assert_eq!(hooks[1].describe(), "PUT http://127.0.0.1:9200/idx");
        assert_eq!(hooks[0].describe(), "command redis-cli");
    }

    #[tokio::test]
    async fn command_gets_env_and_stdin() {
        let runner = HookRunner::new();
        let ok = validate(
            "hooks",
            vec![cmd(
                &[
                    "sh",
                    "-c",
                    "read line; [ \"$line\" = hello ] && [ \"$SECRET\" = hunter2 ]",
                ],
                "hello\n",
                0,
            )],
        )
        .unwrap();
        runner.run_all("bind", "i", &ok).await.unwrap();
    }

    #[tokio::test]
    async fn command_failure_reports_status_and_stderr_tail() {
        let runner = HookRunner::new();
        let script = "for i in $(seq 1 30); do echo line$i >&2; done; exit 3";
        let hooks = validate("hooks", vec![cmd(&["sh", "-c", script], "", 0)]).unwrap();
        let err = runner.run_all("bind", "i", &hooks).await.unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.starts_with("bind hook 1 of 1 (command sh) exited with exit status: 3"),
            "{msg}"
        );
        assert!(msg.contains("line30") && msg.contains("line11"), "{msg}");
        assert!(!msg.contains("line10\n"), "{msg}");
        assert!(!err.summary().contains("line30"));
        assert_eq!(
            tonic::Status::from(err).code(),
            tonic::Code::FailedPrecondition
        );
    }

    #[tokio::test]
    async fn command_timeout_kills_the_group() {
        let runner = HookRunner::new();
        let marker = format!("svcbroker-hook-timeout-{}", std::process::id());
        // A background child holding stderr must die with the group too.
        let script = format!("sleep 30 & exec sleep 31 # {marker}");
        let hooks = validate("hooks", vec![cmd(&["sh", "-c", &script], "", 300)]).unwrap();
        let started = Instant::now();
        let err = runner.run_all("provision", "i", &hooks).await.unwrap_err();
        assert!(started.elapsed() < Duration::from_secs(5));
        assert!(err.to_string().contains("timed out after 300 ms"), "{err}");
        assert_eq!(tonic::Status::from(err).code(), tonic::Code::Unavailable);
        tokio::time::sleep(Duration::from_millis(200)).await;
        let left = std::fs::read_dir("/proc")
            .unwrap()
            .flatten()
            .filter(|e| {
                std::fs::read(e.path().join("cmdline"))
                    .map(|c| String::from_utf8_lossy(&c).contains(&marker))
                    .unwrap_or(false)
            })
            .count();
        assert_eq!(left, 0, "hook processes left behind");
    }

    #[tokio::test]
    async fn missing_program_is_an_error() {
        let runner = HookRunner::new();
        let hooks = validate("hooks", vec![cmd(&["svcbroker-no-such-program"], "", 0)]).unwrap();
        let msg = runner
            .run_all("unbind", "i", &hooks)
            .await
            .unwrap_err()
            .to_string();
        assert!(msg.contains("cannot be started"), "{msg}");
    }

    #[test]
    fn tail_keeps_last_lines() {
        let text: String = (1..=25).map(|i| format!("l{i}\n")).collect();
        let t = tail_lines(text.as_bytes());
        assert!(t.starts_with("stderr:\nl6\n") && t.ends_with("l25"), "{t}");
        assert_eq!(tail_lines(b""), "");
    }
}

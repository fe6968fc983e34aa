//! Hand-written `Debug` for generated messages that carry secrets: they show
//! the shape of the message and never a password or a file's content.

use std::fmt;

use crate::v1::{BindRequest, CommandHook, Credential, FileSpec, HttpHook, ProcessSpec};

const REDACTED: &str = "<redacted>";

impl fmt::Debug for Credential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credential")
            .field("owner", &self.owner)
            .field("kind", &self.kind)
            .field("username", &self.username)
            .field("password", &REDACTED)
            .finish()
    }
}

impl fmt::Debug for FileSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FileSpec")
            .field("path", &self.path)
            .field("content", &format_args!("<{} bytes>", self.content.len()))
            .field("mode", &format_args!("{:o}", self.mode))
            .finish()
    }
}

impl fmt::Debug for ProcessSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Environment values may be secrets; their names are not.
        let env: Vec<&String> = self.env.keys().collect();
        f.debug_struct("ProcessSpec")
            .field("argv", &self.argv)
            .field("env", &env)
            .field("files", &self.files)
            .field("ready_timeout_ms", &self.ready_timeout_ms)
            .finish()
    }
}

impl fmt::Debug for BindRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BindRequest")
            .field("instance_id", &self.instance_id)
            .field("binding_id", &self.binding_id)
            .field("username", &self.username)
            .field("password", &REDACTED)
            .field("hooks", &self.hooks)
            .field("kind", &self.kind)
            .field("database", &self.database)
            .finish()
    }
}

impl fmt::Debug for CommandHook {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let env: Vec<&String> = self.env.keys().collect();
        f.debug_struct("CommandHook")
            .field("argv", &self.argv)
            .field("env", &env)
            .field("stdin", &format_args!("<{} bytes>", self.stdin.len()))
            .field("timeout_ms", &self.timeout_ms)
            .finish()
    }
}

impl fmt::Debug for HttpHook {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Header values (Authorization) and bodies may hold secrets; a URL
        // may too (user:password@), so only its scheme and host are shown.
        let headers: Vec<&String> = self.headers.keys().collect();
        let shown = self
            .url
            .split_once("://")
            .map(|(scheme, rest)| {
                let host = rest.split('/').next().unwrap_or("");
                let host = host.rsplit('@').next().unwrap_or(host);
                format!("{scheme}://{host}/…")
            })
            .unwrap_or_else(|| "<url>".into());
        f.debug_struct("HttpHook")
            .field("method", &self.method)
            .field("url", &shown)
            .field("headers", &headers)
            .field("body", &format_args!("<{} bytes>", self.body.len()))
            .field("timeout_ms", &self.timeout_ms)
            .field("accept_status", &self.accept_status)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_never_shows_secrets() {
        let c = Credential {
            password: "hunter2".into(),
            ..Default::default()
        };
        let p = ProcessSpec {
            argv: vec!["redis-server".into()],
            env: [("PW".to_string(), "hunter2".to_string())].into(),
            files: vec![FileSpec {
                path: "redis.conf".into(),
                content: "requirepass hunter2".into(),
                mode: 0o600,
            }],
            ready_timeout_ms: 0,
        };
        let b = BindRequest {
            password: "hunter2".into(),
            ..Default::default()
        };
        let h = CommandHook {
            argv: vec!["redis-cli".into()],
            env: [("REDISCLI_AUTH".to_string(), "hunter2".to_string())].into(),
            stdin: "ACL SETUSER u on >hunter2".into(),
            timeout_ms: 0,
        };
        let w = HttpHook {
            url: "http://admin:hunter2@search:9200/idx?token=hunter2".into(),
            headers: [("authorization".to_string(), "Basic hunter2".to_string())].into(),
            body: "{\"password\":\"hunter2\"}".into(),
            ..Default::default()
        };
        let texts = [
            format!("{c:?}"),
            format!("{p:?}"),
            format!("{b:?}"),
            format!("{h:?}"),
            format!("{w:?}"),
        ];
        for text in texts {
            assert!(!text.contains("hunter2"), "{text}");
        }
        assert!(format!("{p:?}").contains("redis.conf"));
    }
}

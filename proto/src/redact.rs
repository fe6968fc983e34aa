//! Hand-written `Debug` for generated messages that carry secrets: they show
//! the shape of the message and never a password or a file's content.

use std::fmt;

use crate::v1::{BindRequest, Credential, FileSpec, ProcessSpec};

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
        for text in [format!("{c:?}"), format!("{p:?}"), format!("{b:?}")] {
            assert!(!text.contains("hunter2"), "{text}");
        }
        assert!(format!("{p:?}").contains("redis.conf"));
    }
}

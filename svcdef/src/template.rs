//! `{{ name }}` templates: parsed once at load (so unknown variables are
//! found before any request), rendered per instance or binding.

use std::collections::BTreeMap;

use serde_json::Value;

/// One piece of a parsed template.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Text(String),
    Var(String),
}

/// A parsed template string.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    parts: Vec<Part>,
}

/// Why a template string could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("unclosed '{{{{' in template")]
    Unclosed,
    #[error("empty variable name in template")]
    Empty,
    #[error("invalid variable name '{0}' in template")]
    BadName(String),
}

/// Why a template could not be rendered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RenderError {
    #[error("template variable '{0}' has no value")]
    Missing(String),
    #[error("value of '{0}' must be a string, number or boolean")]
    NotScalar(String),
    // A newline in a parameter could smuggle extra directives into a rendered
    // config file (e.g. a second redis.conf line), so control characters are
    // refused outright.
    #[error("value of '{0}' contains control characters")]
    ControlChars(String),
    /// The rendered text is not valid where it is used.
    #[error("{0}")]
    Invalid(String),
}

impl Template {
    /// Parses `source`; `{{ name }}` is a variable, everything else text.
    pub fn parse(source: &str) -> Result<Template, ParseError> {
        let mut parts = Vec::new();
        let mut rest = source;
        while let Some(start) = rest.find("{{") {
            if start > 0 {
                parts.push(Part::Text(rest[..start].to_string()));
            }
            let after = &rest[start + 2..];
            let end = after.find("}}").ok_or(ParseError::Unclosed)?;
            let name = after[..end].trim();
            if name.is_empty() {
                return Err(ParseError::Empty);
            }
            let valid = name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.');
            if !valid {
                return Err(ParseError::BadName(name.to_string()));
            }
            parts.push(Part::Var(name.to_string()));
            rest = &after[end + 2..];
        }
        if !rest.is_empty() {
            parts.push(Part::Text(rest.to_string()));
        }
        Ok(Template { parts })
    }

    /// Returns the variable names this template uses.
    pub fn variables(&self) -> impl Iterator<Item = &str> {
        self.parts.iter().filter_map(|p| match p {
            Part::Var(v) => Some(v.as_str()),
            Part::Text(_) => None,
        })
    }

    /// Renders to a string.
    pub fn render(&self, vars: &Vars) -> Result<String, RenderError> {
        let mut out = String::new();
        for part in &self.parts {
            match part {
                Part::Text(t) => out.push_str(t),
                Part::Var(name) => out.push_str(&vars.scalar(name)?),
            }
        }
        Ok(out)
    }

    /// Renders to a JSON value: a template that is exactly one variable keeps
    /// the variable's type (so `"{{port}}"` gives the number 6379), anything
    /// else becomes a string.
    pub fn render_value(&self, vars: &Vars) -> Result<Value, RenderError> {
        if let [Part::Var(name)] = self.parts.as_slice() {
            vars.scalar(name)?;
            return Ok(vars.get(name).cloned().unwrap_or(Value::Null));
        }
        self.render(vars).map(Value::String)
    }
}

/// The values a template is rendered with.
#[derive(Clone, Default)]
pub struct Vars {
    values: BTreeMap<String, Value>,
}

// Values include passwords: never print them.
impl std::fmt::Debug for Vars {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vars")
            .field("names", &self.values.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl Vars {
    /// Returns an empty set of values.
    pub fn new() -> Vars {
        Vars::default()
    }

    /// Sets `name` to `value`, replacing any earlier value.
    pub fn set(&mut self, name: &str, value: impl Into<Value>) -> &mut Vars {
        self.values.insert(name.to_string(), value.into());
        self
    }

    /// Returns the value of `name`, if set.
    pub fn get(&self, name: &str) -> Option<&Value> {
        self.values.get(name)
    }

    fn scalar(&self, name: &str) -> Result<String, RenderError> {
        let text = match self.values.get(name) {
            None => return Err(RenderError::Missing(name.to_string())),
            Some(Value::String(s)) => s.clone(),
            Some(Value::Number(n)) => n.to_string(),
            Some(Value::Bool(b)) => b.to_string(),
            Some(_) => return Err(RenderError::NotScalar(name.to_string())),
        };
        if text.chars().any(char::is_control) {
            return Err(RenderError::ControlChars(name.to_string()));
        }
        Ok(text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn parses_and_renders() {
        let t = Template::parse("redis://:{{ password }}@{{host}}:{{port}}").unwrap();
        let mut v = Vars::new();
        v.set("password", "pw").set("host", "h").set("port", 6379);
        assert_eq!(t.render(&v).unwrap(), "redis://:pw@h:6379");
        assert_eq!(
            t.variables().collect::<Vec<_>>(),
            ["password", "host", "port"]
        );
    }

    #[test]
    fn single_variable_keeps_type() {
        let mut v = Vars::new();
        v.set("port", 6379);
        let t = Template::parse("{{port}}").unwrap();
        assert_eq!(t.render_value(&v).unwrap(), json!(6379));
        let t = Template::parse("p{{port}}").unwrap();
        assert_eq!(t.render_value(&v).unwrap(), json!("p6379"));
    }

    #[test]
    fn rejects_bad_templates_and_values() {
        assert_eq!(Template::parse("{{x"), Err(ParseError::Unclosed));
        assert_eq!(Template::parse("{{ }}"), Err(ParseError::Empty));
        assert!(matches!(
            Template::parse("{{a b}}"),
            Err(ParseError::BadName(_))
        ));
        let t = Template::parse("maxmemory {{m}}").unwrap();
        let mut v = Vars::new();
        assert_eq!(t.render(&v), Err(RenderError::Missing("m".into())));
        v.set("m", "1mb\nslaveof evil 1");
        assert_eq!(t.render(&v), Err(RenderError::ControlChars("m".into())));
        v.set("m", json!({"a": 1}));
        assert_eq!(t.render(&v), Err(RenderError::NotScalar("m".into())));
        assert!(
            !format!("{v:?}").contains("evil"),
            "Debug must not print values"
        );
    }
}

//! The part of Compute's list `filter` syntax the fake understands:
//! comparisons `FIELD = VALUE` and `FIELD != VALUE` (VALUE bare or
//! double-quoted), one bare or several parenthesised, joined by spaces or
//! `AND`. FIELD is a dotted path into the resource (`labels.kiln-bridge`,
//! `status`, `name`). Anything else (`OR`, `:`, `eq`/`ne` regular
//! expressions) is refused, so a client that sends it finds out here
//! rather than against Google.

use serde_json::Value;

/// One comparison.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Term {
    pub field: Vec<String>,
    pub equal: bool,
    pub value: String,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Token {
    Open,
    Close,
    Eq,
    Ne,
    Word(String),
    Quoted(String),
}

fn tokens(s: &str) -> Result<Vec<Token>, String> {
    let mut out = Vec::new();
    let mut chars = s.chars().peekable();
    while let Some(&c) = chars.peek() {
        match c {
            c if c.is_whitespace() => {
                chars.next();
            }
            '(' => {
                chars.next();
                out.push(Token::Open);
            }
            ')' => {
                chars.next();
                out.push(Token::Close);
            }
            '=' => {
                chars.next();
                out.push(Token::Eq);
            }
            '!' => {
                chars.next();
                if chars.next() != Some('=') {
                    return Err("'!' must start '!='".into());
                }
                out.push(Token::Ne);
            }
            '"' => {
                chars.next();
                let mut v = String::new();
                loop {
                    match chars.next() {
                        Some('"') => break,
                        Some('\\') => match chars.next() {
                            Some(e) => v.push(e),
                            None => return Err("unterminated string".into()),
                        },
                        Some(c) => v.push(c),
                        None => return Err("unterminated string".into()),
                    }
                }
                out.push(Token::Quoted(v));
            }
            c if c.is_ascii_alphanumeric() || "-_./*".contains(c) => {
                let mut w = String::new();
                while let Some(&c) = chars.peek() {
                    if c.is_ascii_alphanumeric() || "-_./*".contains(c) {
                        w.push(c);
                        chars.next();
                    } else {
                        break;
                    }
                }
                out.push(Token::Word(w));
            }
            other => return Err(format!("unsupported character {other:?}")),
        }
    }
    Ok(out)
}

/// Parses a filter; an empty one matches everything.
pub fn parse(s: &str) -> Result<Vec<Term>, String> {
    let toks = tokens(s)?;
    let mut terms = Vec::new();
    let mut i = 0;
    let comparison = |i: usize| -> Result<Term, String> {
        let field = match toks.get(i) {
            Some(Token::Word(w)) => w.clone(),
            other => return Err(format!("expected a field name, got {other:?}")),
        };
        if field.contains('*') || field.split('.').any(str::is_empty) {
            return Err(format!("bad field name {field:?}"));
        }
        let equal = match toks.get(i + 1) {
            Some(Token::Eq) => true,
            Some(Token::Ne) => false,
            other => return Err(format!("expected = or != after {field}, got {other:?}")),
        };
        let value = match toks.get(i + 2) {
            Some(Token::Word(w)) | Some(Token::Quoted(w)) => w.clone(),
            other => return Err(format!("expected a value after {field}, got {other:?}")),
        };
        Ok(Term {
            field: field.split('.').map(str::to_string).collect(),
            equal,
            value,
        })
    };
    while i < toks.len() {
        match &toks[i] {
            Token::Word(w) if w == "AND" => i += 1,
            Token::Word(w) if w == "OR" || w == "NOT" => {
                return Err(format!("{w} is not supported by the fake"))
            }
            Token::Open => {
                terms.push(comparison(i + 1)?);
                if toks.get(i + 4) != Some(&Token::Close) {
                    return Err("expected ) after a comparison".into());
                }
                i += 5;
            }
            _ => {
                // A bare comparison only stands alone.
                if !terms.is_empty() || toks.len() != 3 {
                    return Err("several comparisons must each be in parentheses".into());
                }
                terms.push(comparison(i)?);
                i += 3;
            }
        }
    }
    Ok(terms)
}

/// Whether `resource` passes every term.
pub fn matches(terms: &[Term], resource: &Value) -> bool {
    terms.iter().all(|t| {
        let mut v = resource;
        for part in &t.field {
            v = &v[part.as_str()];
        }
        let found = match v {
            Value::String(s) => Some(s.clone()),
            Value::Bool(b) => Some(b.to_string()),
            Value::Number(n) => Some(n.to_string()),
            _ => None,
        };
        (found.as_deref() == Some(t.value.as_str())) == t.equal
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn parses_the_forms_clients_send() {
        let one = parse("labels.kiln-bridge = \"b-1\"").unwrap();
        assert_eq!(one.len(), 1);
        assert_eq!(one[0].field, ["labels", "kiln-bridge"]);
        assert_eq!(one[0].value, "b-1");
        let two = parse("(labels.kiln-bridge = b-1) AND (status != TERMINATED)").unwrap();
        assert_eq!(two.len(), 2);
        assert!(!two[1].equal);
        let juxtaposed = parse("(labels.a = \"x\") (labels.b = \"y\")").unwrap();
        assert_eq!(juxtaposed.len(), 2);
        assert!(parse("").unwrap().is_empty());
    }

    #[test]
    fn refuses_what_it_does_not_model() {
        for bad in [
            "(a = b) OR (c = d)",
            "a = b c = d",
            "labels.a:*",
            "name eq 'x.*'",
            "(a = b",
            "a = \"x",
            "= b",
        ] {
            assert!(parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn matches_nested_fields() {
        let r = json!({"name": "n", "status": "RUNNING", "labels": {"a": "x"}});
        let m = |f: &str| matches(&parse(f).unwrap(), &r);
        assert!(m("labels.a = x"));
        assert!(!m("labels.a = y"));
        assert!(!m("labels.b = x"));
        assert!(m("labels.b != x"));
        assert!(m("(labels.a = x) (status = RUNNING)"));
        assert!(!m("(labels.a = x) (status = STOPPED)"));
    }
}

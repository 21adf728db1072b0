//! Errors as one line: every cause once, control characters escaped (registry bodies and tar
//! names are hostile input and must not forge log lines or move a terminal's cursor).

/// Formats an error with its causes, leaving out causes the message already includes.
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let part = s.to_string();
        if !text.contains(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        source = s.source();
    }
    text
}

/// `text` with control characters escaped (`\n`, `\u{1b}`, ...), fit for one log or terminal line.
pub fn printable(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_chain_skips_repeated_causes() {
        #[derive(Debug, thiserror::Error)]
        #[error("outer: {0}")]
        struct Outer(#[source] std::io::Error);
        let e = Outer(std::io::Error::other("inner"));
        assert_eq!(error_chain(&e), "outer: inner");
    }

    #[test]
    fn control_characters_are_escaped() {
        let forged = "x\ntalos: published sha256:0 (2 files)\u{1b}[1A\r";
        let p = printable(forged);
        assert!(!p.chars().any(char::is_control), "{p:?}");
        assert!(p.contains("\\n") && p.contains("\\u{1b}"), "{p}");
        assert_eq!(printable("plain ünïcode"), "plain ünïcode");
    }
}

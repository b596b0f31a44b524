//! An error and its chain of sources as one line ("a: b: c"), as storaged, vmm and the agent
//! log them and print them when they exit. A source whose message the line already ends with
//! (an error that includes its source's message in its own) is not repeated.

/// Formats `e` with its whole chain of sources: "a: b: c".
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let msg = c.to_string();
        if !s.ends_with(&msg) {
            s.push_str(": ");
            s.push_str(&msg);
        }
        cur = c.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    enum Outer {
        #[error("Cannot open {0}")]
        Open(&'static str, #[source] std::io::Error),
        #[error("Wrapped: {0}")]
        Repeats(#[source] std::io::Error),
    }

    #[test]
    fn each_source_follows_its_error() {
        let e = Outer::Open("/d", std::io::Error::other("denied"));
        assert_eq!(chain(&e), "Cannot open /d: denied");
    }

    #[test]
    fn a_source_the_message_already_ends_with_is_not_repeated() {
        let e = Outer::Repeats(std::io::Error::other("denied"));
        assert_eq!(chain(&e), "Wrapped: denied");
    }
}

//! A check on a query's text before it is parsed: how many operators it chains.
//!
//! DataFusion guards the parser's recursion (nested parentheses, subqueries and function calls
//! fail at depth 50), but a flat chain such as `1 + 1 + … + 1` or `a AND b AND …` parses into
//! a tree as deep as the chain is long, and some planning and evaluation passes walk that tree
//! recursively: ten thousand terms overflowed a thread's stack and aborted the whole server.
//! Counting the operators on the token stream (the tokenizer is a loop, and its output a flat
//! list) refuses such a query before any tree exists.

use datafusion::sql::sqlparser::dialect::GenericDialect;
use datafusion::sql::sqlparser::keywords::Keyword;
use datafusion::sql::sqlparser::tokenizer::{Token, Tokenizer};

/// Most operators one statement may hold. Real queries use tens; the stack holds thousands.
pub const MAX_OPERATORS: usize = 1_000;

/// Why a query was refused before parsing.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum GuardError {
    /// The text does not tokenize.
    #[error("SQL error: {0}")]
    Tokenize(String),
    /// Too many operators.
    #[error(
        "the query has {found} operators, more than the limit of {limit}; split it, or use IN (...) for long lists of alternatives"
    )]
    TooComplex {
        /// Operators found.
        found: usize,
        /// The limit.
        limit: usize,
    },
}

/// Whether a token joins two expressions (or prefixes one) into a deeper tree.
fn is_operator(t: &Token) -> bool {
    match t {
        Token::Word(w) => matches!(
            w.keyword,
            Keyword::AND
                | Keyword::OR
                | Keyword::XOR
                | Keyword::NOT
                | Keyword::IS
                | Keyword::LIKE
                | Keyword::ILIKE
                | Keyword::SIMILAR
                | Keyword::BETWEEN
                | Keyword::COLLATE
                | Keyword::AT
                | Keyword::CASE
                | Keyword::WHEN
        ),
        Token::EOF
        | Token::Number(..)
        | Token::Char(_)
        | Token::SingleQuotedString(_)
        | Token::DoubleQuotedString(_)
        | Token::TripleSingleQuotedString(_)
        | Token::TripleDoubleQuotedString(_)
        | Token::DollarQuotedString(_)
        | Token::SingleQuotedByteStringLiteral(_)
        | Token::DoubleQuotedByteStringLiteral(_)
        | Token::TripleSingleQuotedByteStringLiteral(_)
        | Token::TripleDoubleQuotedByteStringLiteral(_)
        | Token::SingleQuotedRawStringLiteral(_)
        | Token::DoubleQuotedRawStringLiteral(_)
        | Token::TripleSingleQuotedRawStringLiteral(_)
        | Token::TripleDoubleQuotedRawStringLiteral(_)
        | Token::NationalStringLiteral(_)
        | Token::QuoteDelimitedStringLiteral(_)
        | Token::NationalQuoteDelimitedStringLiteral(_)
        | Token::EscapedStringLiteral(_)
        | Token::UnicodeStringLiteral(_)
        | Token::HexStringLiteral(_)
        | Token::Placeholder(_)
        | Token::Comma
        | Token::Whitespace(_)
        | Token::LParen
        | Token::RParen
        | Token::Period
        | Token::Colon
        | Token::SemiColon
        | Token::RBracket
        | Token::LBrace
        | Token::RBrace => false,
        _ => true,
    }
}

/// Refuses a query that chains more than `limit` operators.
pub fn check(sql: &str, limit: usize) -> Result<(), GuardError> {
    let tokens = Tokenizer::new(&GenericDialect {}, sql)
        .tokenize()
        .map_err(|e| GuardError::Tokenize(e.to_string()))?;
    let found = tokens.iter().filter(|t| is_operator(t)).count();
    if found > limit {
        return Err(GuardError::TooComplex { found, limit });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ordinary_queries_pass() {
        for q in [
            "SELECT collection, count(*) FROM events WHERE kind = 'commit' AND time > now() - INTERVAL '1 hour' GROUP BY 1",
            "SELECT record->>'text' FROM posts WHERE did IN ('a', 'b', 'c') AND NOT (rkey LIKE '3%')",
            "SELECT CASE WHEN a > 1 THEN 'x' ELSE 'y' END, b::int FROM t",
        ] {
            assert_eq!(check(q, MAX_OPERATORS), Ok(()), "{q}");
        }
        // long IN lists are commas, not operators
        let list: Vec<String> = (0..50_000).map(|i| format!("'did:plc:{i}'")).collect();
        let q = format!("SELECT 1 FROM events WHERE did IN ({})", list.join(","));
        assert_eq!(check(&q, MAX_OPERATORS), Ok(()));
    }

    #[test]
    fn long_chains_are_refused_before_parsing() {
        let plus = format!("SELECT 1{}", " + 1".repeat(5_000));
        assert_eq!(
            check(&plus, MAX_OPERATORS),
            Err(GuardError::TooComplex {
                found: 5_000,
                limit: MAX_OPERATORS
            })
        );
        let and = format!("SELECT 1 WHERE {}", vec!["a = 1"; 2_000].join(" AND "));
        assert!(matches!(
            check(&and, MAX_OPERATORS),
            Err(GuardError::TooComplex { found: 3_999, .. })
        ));
        let concat = format!("SELECT 'a'{}", "||'a'".repeat(1_001));
        assert!(check(&concat, MAX_OPERATORS).is_err());
        // operators inside strings and comments do not count
        let s = format!("SELECT '{}' -- {}", "+".repeat(10_000), "+".repeat(10_000));
        assert_eq!(check(&s, MAX_OPERATORS), Ok(()));
    }

    #[test]
    fn untokenizable_text_is_an_error_not_a_panic() {
        assert!(matches!(
            check("SELECT 'unterminated", MAX_OPERATORS),
            Err(GuardError::Tokenize(_))
        ));
        // control characters and replacement characters: a result either way, never a panic
        let _ = check("\u{0}\u{1}\u{fffd}", MAX_OPERATORS);
    }
}

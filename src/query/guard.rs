//! A check on a query's text before it is parsed: how many operators it chains.
//!
//! DataFusion guards the parser's recursion (nested parentheses, subqueries and function calls
//! fail at depth 50), but a flat chain such as `1 + 1 + … + 1` or `a AND b AND …` parses into
//! a tree as deep as the chain is long, and some planning and evaluation passes walk that tree
//! recursively: ten thousand terms overflowed a thread's stack and aborted the whole server.
//! Counting the operators on the token stream (the tokenizer is a loop, and its output a flat
//! list) refuses such a query before any tree exists.
//!
//! The same holds for chains of query blocks: `SELECT 1 UNION ALL SELECT 1 …` (and `INTERSECT`,
//! `EXCEPT`), `FROM a, b, c, …`, `a CROSS JOIN b JOIN c ON true …`, 3,000 CTEs or comma-joined
//! subqueries parse in a loop but plan into a tree as deep as the chain, and three thousand of
//! them overflowed a stack. Every `SELECT`, set operation, `JOIN` and comma between the
//! relations of a `FROM` counts as one *relation*; a statement may hold [`MAX_RELATIONS`].
//! `IN` counts as an operator (`true IN (true) IN (true) …` nests like `+`).
//!
//! What this count does not see is bounded elsewhere: parentheses (nested expressions,
//! subqueries, function calls) by the parser's recursion limit (`sql_parser.recursion_limit`,
//! 50), and the text by the request body limit. Together they bound the depth of every tree
//! the planner builds; planning and execution then run on threads with large stacks
//! (`query::pool`).

use datafusion::sql::sqlparser::dialect::GenericDialect;
use datafusion::sql::sqlparser::keywords::Keyword;
use datafusion::sql::sqlparser::tokenizer::{Token, Tokenizer};

/// Most operators one statement may hold. Real queries use tens. The stack would hold
/// thousands, but optimising a chain takes time quadratic in its length (1,000 `+`: 2.2 s,
/// 300: 0.2 s in a debug build), in single steps the deadline cannot interrupt.
pub const MAX_OPERATORS: usize = 300;

/// Most query blocks nested inside each other (`SELECT (SELECT (SELECT …)))`,
/// `FROM (SELECT … FROM (SELECT …))`): optimising nested scalar subqueries takes about four
/// times longer with each level (12 levels: 0.4 s, 15: 2.9 s in a debug build).
pub const MAX_NESTING: usize = 10;

/// Most relations (query blocks, set operations, joins) one statement may hold. Real queries
/// use a handful; a chain of 3,000 overflowed a 2 MiB stack.
pub const MAX_RELATIONS: usize = 200;

/// Most literal values (numbers, strings) one statement may hold. Planning takes time and
/// memory in proportion to them (an `IN` list of 50,000 numbers: 4.2 s and 10 MiB in a debug
/// build; 150,000, the most a 1 MiB body holds: past a 5 s timeout and 79 MiB); a longer
/// list belongs in a table.
pub const MAX_VALUES: usize = 50_000;

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
    /// Query blocks nested too deep.
    #[error(
        "the query nests {found} SELECTs inside each other, more than the limit of {limit}; use WITH or joins"
    )]
    TooDeep {
        /// Depth found.
        found: usize,
        /// The limit.
        limit: usize,
    },
    /// Too many query blocks, set operations and joins.
    #[error(
        "the query has {found} SELECTs, set operations and joins, more than the limit of {limit}; split it into several queries"
    )]
    TooManyRelations {
        /// Relations found.
        found: usize,
        /// The limit.
        limit: usize,
    },
    /// Too many literal values.
    #[error(
        "the query has {found} literal values, more than the limit of {limit}; put long lists in a table and join it"
    )]
    TooManyValues {
        /// Values found.
        found: usize,
        /// The limit.
        limit: usize,
    },
}

/// Whether a token is a literal value.
fn is_value(t: &Token) -> bool {
    matches!(
        t,
        Token::Number(..)
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
    )
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
                | Keyword::IN
        ),
        t if is_value(t) => false,
        Token::EOF
        | Token::Char(_)
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

/// Whether a keyword ends the `FROM` clause of the query block it appears in.
fn ends_from(k: Keyword) -> bool {
    matches!(
        k,
        Keyword::WHERE
            | Keyword::GROUP
            | Keyword::HAVING
            | Keyword::ORDER
            | Keyword::LIMIT
            | Keyword::OFFSET
            | Keyword::WINDOW
            | Keyword::QUALIFY
            | Keyword::UNION
            | Keyword::INTERSECT
            | Keyword::EXCEPT
            | Keyword::SELECT
            | Keyword::ON
            | Keyword::USING
    )
}

/// How deep `SELECT`s nest: the most parenthesis levels holding a `SELECT` that enclose one
/// another.
fn nesting(tokens: &[Token]) -> usize {
    // per open parenthesis: the nesting of SELECTs outside it, and whether it holds one
    let mut stack: Vec<(usize, bool)> = vec![(0, false)];
    let mut deepest = 0;
    for t in tokens {
        match t {
            Token::LParen => {
                let outer = stack.last().map_or(0, |(d, s)| d + usize::from(*s));
                stack.push((outer, false));
            }
            Token::RParen if stack.len() > 1 => {
                stack.pop();
            }
            Token::Word(w) if w.keyword == Keyword::SELECT => {
                if let Some(top) = stack.last_mut() {
                    top.1 = true;
                    deepest = deepest.max(top.0 + 1);
                }
            }
            _ => {}
        }
    }
    deepest
}

/// Counts the relations of a token stream: `SELECT`s, set operations, `JOIN`s, and commas
/// between the relations of a `FROM` clause (at the parenthesis depth of its `FROM`).
fn relations(tokens: &[Token]) -> usize {
    // per parenthesis depth: whether a FROM clause is open at that depth
    let mut in_from = vec![false];
    let mut found = 0usize;
    for t in tokens {
        match t {
            Token::LParen => in_from.push(false),
            Token::RParen if in_from.len() > 1 => {
                in_from.pop();
            }
            Token::Comma if in_from.last().copied().unwrap_or(false) => {
                found += 1;
            }
            Token::Word(w) => {
                match w.keyword {
                    Keyword::SELECT
                    | Keyword::UNION
                    | Keyword::INTERSECT
                    | Keyword::EXCEPT
                    | Keyword::MINUS
                    | Keyword::JOIN => found += 1,
                    _ => {}
                }
                if let Some(open) = in_from.last_mut() {
                    if w.keyword == Keyword::FROM {
                        *open = true;
                    } else if ends_from(w.keyword) {
                        *open = false;
                    }
                }
            }
            _ => {}
        }
    }
    found
}

/// Refuses a query that chains more than `limit` operators, or more than [`MAX_RELATIONS`]
/// query blocks, set operations and joins.
pub fn check(sql: &str, limit: usize) -> Result<(), GuardError> {
    let tokens = Tokenizer::new(&GenericDialect {}, sql)
        .tokenize()
        .map_err(|e| GuardError::Tokenize(e.to_string()))?;
    let found = tokens.iter().filter(|t| is_operator(t)).count();
    if found > limit {
        return Err(GuardError::TooComplex { found, limit });
    }
    let found = nesting(&tokens);
    if found > MAX_NESTING {
        return Err(GuardError::TooDeep {
            found,
            limit: MAX_NESTING,
        });
    }
    let found = relations(&tokens);
    if found > MAX_RELATIONS {
        return Err(GuardError::TooManyRelations {
            found,
            limit: MAX_RELATIONS,
        });
    }
    let found = tokens.iter().filter(|t| is_value(t)).count();
    if found > MAX_VALUES {
        return Err(GuardError::TooManyValues {
            found,
            limit: MAX_VALUES,
        });
    }
    Ok(())
}

/// Deep SQL of every shape that parses in a loop or nests, `n` links long: what the guard and
/// the parser's recursion limit must refuse before it can exhaust a stack (for tests and
/// fuzzing; each shape's name first).
pub fn deep_sql(n: usize) -> Vec<(&'static str, String)> {
    let sub = |k: usize| format!("(SELECT {k} AS x) t{k}");
    let joined = |sep: &str| (0..n).map(sub).collect::<Vec<_>>().join(sep);
    vec![
        (
            "union",
            format!("SELECT 1 AS x{}", " UNION ALL SELECT 1".repeat(n)),
        ),
        (
            "intersect",
            format!("SELECT 1 AS x{}", " INTERSECT SELECT 1".repeat(n)),
        ),
        (
            "except",
            format!("SELECT 1 AS x{}", " EXCEPT SELECT 1".repeat(n)),
        ),
        (
            "comma join",
            format!("SELECT count(*) FROM {}", joined(", ")),
        ),
        (
            "comma join of tables",
            format!(
                "SELECT count(*) FROM {}",
                (0..n)
                    .map(|k| format!("events e{k}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        ),
        (
            "cross join",
            format!("SELECT count(*) FROM {}", joined(" CROSS JOIN ")),
        ),
        (
            "join on true",
            format!(
                "SELECT count(*) FROM {}{}",
                sub(0),
                (1..n)
                    .map(|k| format!(" JOIN {} ON true", sub(k)))
                    .collect::<String>()
            ),
        ),
        (
            "cte chain",
            format!(
                "WITH c0 AS (SELECT 1 AS x){} SELECT * FROM c{}",
                (1..n)
                    .map(|k| format!(", c{k} AS (SELECT x FROM c{})", k - 1))
                    .collect::<String>(),
                n.saturating_sub(1)
            ),
        ),
        ("in chain", format!("SELECT true{}", " IN (true)".repeat(n))),
        ("plus chain", format!("SELECT 1{}", " + 1".repeat(n))),
        ("and chain", format!("SELECT true{}", " AND true".repeat(n))),
        ("cast chain", format!("SELECT 1{}", "::int".repeat(n))),
        ("not chain", format!("SELECT {}true", "NOT ".repeat(n))),
        ("minus chain", format!("SELECT {}1", "- ".repeat(n))),
        (
            "nested subqueries",
            format!("SELECT {}1{}", "(SELECT ".repeat(n), ")".repeat(n)),
        ),
        (
            "nested from",
            format!(
                "{}SELECT 1 AS x{}",
                "SELECT * FROM (".repeat(n),
                ") t".repeat(n)
            ),
        ),
        (
            "nested parentheses",
            format!("SELECT {}1{}", "(".repeat(n), ")".repeat(n)),
        ),
        (
            "nested calls",
            format!("SELECT {}1{}", "abs(".repeat(n), ")".repeat(n)),
        ),
        (
            "nested case",
            format!(
                "SELECT {}1{}",
                "CASE WHEN true THEN ".repeat(n),
                " ELSE 0 END".repeat(n)
            ),
        ),
        (
            "nested arrays",
            format!("SELECT {}1{}", "[".repeat(n), "]".repeat(n)),
        ),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_list_of_values_stops_at_the_limit() {
        let list = |n: usize| {
            format!(
                "SELECT 1 FROM t WHERE x IN ({}) OR y IN ('a')",
                (1..n).map(|i| i.to_string()).collect::<Vec<_>>().join(",")
            )
        };
        // n - 1 numbers, the string 'a' and the 1 of the select list
        assert_eq!(check(&list(MAX_VALUES - 1), MAX_OPERATORS), Ok(()));
        assert_eq!(
            check(&list(MAX_VALUES), MAX_OPERATORS),
            Err(GuardError::TooManyValues {
                found: MAX_VALUES + 1,
                limit: MAX_VALUES
            })
        );
        let strings = format!("SELECT {}", vec!["'s'"; MAX_VALUES + 1].join(","));
        assert!(matches!(
            check(&strings, MAX_OPERATORS),
            Err(GuardError::TooManyValues { .. })
        ));
    }

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
        let list: Vec<String> = (0..40_000).map(|i| format!("'did:plc:{i}'")).collect();
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

    /// The shapes of [`deep_sql`] the parser refuses (its recursion limit), not [`check`].
    const PARSER_SHAPES: &[&str] = &["nested parentheses", "nested calls"];

    #[test]
    fn chains_of_relations_are_refused_and_short_ones_pass() {
        let mut passed = Vec::new();
        for (shape, q) in deep_sql(3_000) {
            if check(&q, MAX_OPERATORS).is_ok() {
                passed.push(shape);
            }
        }
        // nesting without SELECTs is the parser's recursion limit's to refuse
        assert_eq!(
            passed, PARSER_SHAPES,
            "the guard's share of the deep shapes changed"
        );
        for (shape, q) in deep_sql(MAX_NESTING - 1) {
            assert_eq!(check(&q, MAX_OPERATORS), Ok(()), "{shape}");
        }
        let nested = |n: usize| format!("SELECT {}1{}", "(SELECT ".repeat(n), ")".repeat(n));
        assert_eq!(check(&nested(MAX_NESTING - 1), MAX_OPERATORS), Ok(()));
        assert_eq!(
            check(&nested(MAX_NESTING), MAX_OPERATORS),
            Err(GuardError::TooDeep {
                found: MAX_NESTING + 1,
                limit: MAX_NESTING
            })
        );
        // side by side is not nested
        let side = format!("SELECT {}", vec!["(SELECT 1)"; 50].join(", "));
        assert_eq!(check(&side, MAX_OPERATORS), Ok(()));
        // a FROM inside a function call is not a join list
        let q = "SELECT extract(year FROM time), substring(did FROM 1 FOR 3), a, b, c FROM events, posts WHERE x IN (1, 2, 3)";
        assert_eq!(
            relations(&Tokenizer::new(&GenericDialect {}, q).tokenize().unwrap()),
            2
        );
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

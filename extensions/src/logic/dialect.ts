/**
 * The words MLSQL highlights: DuckDB's SQL, MLSQL's statements (CREATE MODEL, DEPLOY MODEL ...
 * TO DEVICE, EXPORT, ROLLBACK, jobs, devices), and the ML.* functions. Space-separated lists,
 * lower case, the form @codemirror/lang-sql's SQLDialect.define takes. DuckDB's words are listed here;
 * MLSQL's own (statement words, ML.* functions) come from Python (./vocabulary).
 */
import { VOCABULARY } from './vocabulary';

const SQL_KEYWORDS = `
abort absolute access action add admin after aggregate all also alter always analyse analyze and anti any array as asc
asof assertion assignment asymmetric at attach attribute authorization backward before begin between bigint binary
both by cache call called cascade cascaded case cast catalog chain characteristics check checkpoint class close
cluster collate collation column columns comment comments commit committed compression concurrently configuration
conflict connection constraint constraints content continue conversion copy cost create cross csv cube current
cursor cycle data database day days deallocate declare default defaults deferrable deferred definer delete
delimiter delimiters depends desc describe detach dictionary disable discard distinct do document domain drop
each else enable encoding encrypted end enum escape event except exclude excluding exclusive execute exists explain
export export_state extension external extract false family fetch filter first following for force foreign forward
freeze from full function functions generated glob global grant granted group grouping grouping_id groups handler
having header hold hour hours identity if ilike immediate immutable implicit import in include including increment
index indexes inherit inherits initially inline inner inout input insensitive insert install instead intersect
interval into invoker is isnull isolation join json key label language large last lateral leading leakproof left
level like limit listen load local location lock locked logged macro map mapping match materialized maxvalue method
microsecond microseconds millisecond milliseconds minute minutes minvalue mode month months move name names national
natural nchar new next no none not nothing notify notnull nowait null nulls object of off offset oids old on only
operator option options or order ordinality others out outer over overlaps overlay owned owner parallel parser partial
partition passing password percent pivot pivot_longer pivot_wider placing plans policy positional pragma preceding
precision prepare prepared preserve primary prior privileges procedural procedure program publication qualify quote
range read reassign recheck recursive ref references referencing refresh reindex relative release rename repeatable
replace replica reset respect restart restrict returning returns revoke right role rollback rollup row rows rule
sample savepoint schema schemas scroll search second seconds security select semi sequence sequences serializable
server session set setof sets share show similar simple skip snapshot some sql stable standalone start statement
statistics stdin stdout storage stored strict strip struct subscription summarize symmetric sysid system table
tables tablespace temp template temporary text then ties to trailing transaction transform treat trigger trim true
truncate trusted try_cast type types unbounded uncommitted unencrypted union unique unknown unlisten unlogged unpivot
until update use user using vacuum valid validate validator value values variable variadic verbose version view
views virtual volatile when where whitespace window with within without work wrapper write xml year years yes zone
`;

/** MLSQL's own statement words (CREATE MODEL, DEPLOY MODEL m TO DEVICE 'd', CREATE JOB, ...), lower case: Python's parser's. */
export const ML_KEYWORDS: string[] = VOCABULARY.keywords.map(w => w.toLowerCase());

const SQL_TYPES = `
bigint binary bit bitstring blob bool boolean bpchar bytea char character date datetime dec decimal double enum
float float4 float8 hugeint int int1 int128 int16 int2 int32 int4 int64 int8 integer integral interval list long
logical map numeric nvarchar real short signed smallint string struct text time timestamp timestamptz tinyint
ubigint uhugeint uinteger union usmallint utinyint uuid varbinary varchar`;

/** The ML.* functions (table and TRANSFORM functions), upper case: highlighted as builtins (lang-sql reads ML.PREDICT as the words ML, ., PREDICT). */
export const ML_FUNCTIONS: string[] = Object.keys(VOCABULARY.functions);

/** The functions' namespace, `ml`. */
export const ML_NAMESPACE: string = VOCABULARY.namespace.toLowerCase();

const SQL_BUILTINS = `
abs any_value approx_count_distinct approx_quantile arg_max arg_min array_agg avg bit_and bit_or bool_and bool_or
cardinality ceil ceiling coalesce concat concat_ws corr count count_star covar_pop date_diff date_part date_trunc
datediff datepart day dayname dayofweek dayofyear epoch exp first floor greatest hash histogram hour if ifnull
isnan isodow julian kurtosis last least left len length list list_aggregate list_value ln log log10 log2 lower
lpad ltrim mad max max_by md5 median min min_by minute mode month monthname now nullif percentile_cont
percentile_disc pow power quantile quantile_cont quantile_disc quarter random regexp_extract regexp_matches
regexp_replace repeat replace reverse right round row_number rank dense_rank ntile lag lead first_value last_value
nth_value percent_rank cume_dist rpad rtrim sign sin sqrt stddev stddev_pop stddev_samp strftime string_agg
string_split strptime struct_pack substr substring sum time_bucket to_timestamp today trim trunc typeof unnest upper
var_pop var_samp variance week weekday year read_csv read_csv_auto read_parquet read_json read_json_auto range
generate_series`;

function words(text: string): string[] {
  return text.split(/\s+/).filter(Boolean);
}

/** Keywords: DuckDB's plus MLSQL's statements, deduplicated, lower case, space-separated. */
export function keywordList(): string {
  return Array.from(new Set([...words(SQL_KEYWORDS), ...ML_KEYWORDS])).join(' ');
}

/** Builtins: DuckDB functions, `ml` and the ML.* function names, lower case. */
export function builtinList(): string {
  return Array.from(new Set([...words(SQL_BUILTINS), ML_NAMESPACE, ...ML_FUNCTIONS.map(f => f.toLowerCase())])).join(' ');
}

export function typeList(): string {
  return Array.from(new Set(words(SQL_TYPES))).join(' ');
}

/** `{name}` parameters (filled from Python variables by the magic) and `$name` SQL variables. */
export const PARAMETER = /\{[A-Za-z_]\w*\}|\$[A-Za-z_]\w*/g;

/** [from, to) of each `{name}` / `$name` in `text`, skipping those in comments (in a string they are still filled). */
export function parameterRanges(text: string): Array<[number, number]> {
  const out: Array<[number, number]> = [];
  // strings and comments are blanked out (same length), so offsets stay those of the text
  const blank = (m: string) => m.replace(/[^\n]/g, ' ');
  const visible = text
    .replace(/--[^\n]*/g, blank)
    .replace(/\/\*[\s\S]*?\*\//g, blank);
  PARAMETER.lastIndex = 0;
  let m: RegExpExecArray | null;
  while ((m = PARAMETER.exec(visible)) !== null) {
    out.push([m.index, m.index + m[0].length]);
  }
  return out;
}

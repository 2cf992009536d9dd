/**
 * MLSQL's vocabulary as Python declares it: the words of its statements, the ML.* functions and
 * every statement's OPTIONS (types, allowed values, defaults, docs). Not written here: the build
 * (`jlpm build:vocabulary`, run first by `jlpm build` and `jlpm test`) writes
 * src/generated/vocabulary.json with `python -m mlsql.language.vocabulary`, from
 * mlsql/language/options.py, expressions.py and dialect.py. Everything the extension knows of
 * MLSQL's words comes from here.
 */
import data from '../generated/vocabulary.json';

/** One option of one statement kind: mlsql.language.options.Option's fields but its check. */
export interface IOption {
  name: string;
  /** int, float, bool, str, list, enum, struct or duration */
  type: string;
  doc: string;
  default: unknown;
  /** enum: the allowed values (lower case) */
  choices: string[];
  min: number | null;
  max: number | null;
  min_open: boolean;
  max_open: boolean;
  /** list: the type of its items */
  items: string | null;
  min_items: number;
  max_items: number | null;
  /** CREATE MODEL: the model types it applies to (empty: all) */
  model_types: string[];
  required: boolean;
  default_doc: string | null;
  /** what the option takes, in words */
  allowed: string;
  /** provider lists: the provider names it takes */
  values?: string[];
}

/** An ML.* function's argument shape. */
export interface IFunction {
  /** table: used as a table (FROM ML.PREDICT(...)); transform: in CREATE MODEL's TRANSFORM */
  kind: 'table' | 'transform';
  /** its first argument is MODEL m */
  model: boolean;
  /** the names its STRUCT(...) settings take */
  settings: string[];
}

export interface IVocabulary {
  /** the functions' namespace: ML */
  namespace: string;
  /** every word of MLSQL's own statements, upper case */
  keywords: string[];
  functions: Record<string, IFunction>;
  /** statement kind (CREATE MODEL, DEPLOY MODEL, ..., ML.PREDICT) → its options in the table's order */
  options: Record<string, IOption[]>;
  /** the value sets the options draw on: model_type, providers, quantize, tree_format */
  values: Record<string, string[]>;
}

export const VOCABULARY: IVocabulary = data as unknown as IVocabulary;

/** The declared option `name` of a statement kind; throws when Python declares none (a stale build). */
export function option(kind: string, name: string): IOption {
  const found = (VOCABULARY.options[kind] ?? []).find(o => o.name === name);
  if (!found) {
    throw new Error(`the vocabulary has no option ${name} of ${kind}: run \`jlpm build:vocabulary\``);
  }
  return found;
}

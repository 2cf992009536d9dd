/** MLSQL as a CodeMirror 6 language: lang-sql with a DuckDB + ML dialect, and `{name}` / `$name` marked. */
import { SQLDialect } from '@codemirror/lang-sql';
import { LanguageSupport, syntaxHighlighting } from '@codemirror/language';
import { RangeSetBuilder } from '@codemirror/state';
import { Decoration, DecorationSet, EditorView, ViewPlugin, ViewUpdate } from '@codemirror/view';
import { classHighlighter } from '@lezer/highlight';

import { builtinList, keywordList, parameterRanges, typeList } from './logic/dialect';

export const mlsqlDialect = SQLDialect.define({
  keywords: keywordList(),
  builtin: builtinList(),
  types: typeList(),
  operatorChars: '*+-%<>!=&|~^/',
  specialVar: '?',
  identifierQuotes: '"`',
  doubleDollarQuotedStrings: true,
  caseInsensitiveIdentifiers: true
});

const parameterMark = Decoration.mark({ class: 'mlsql-parameter' });
const magicLine = Decoration.line({ class: 'mlsql-magic-line' });

function decorate(view: EditorView): DecorationSet {
  const builder = new RangeSetBuilder<Decoration>();
  const text = view.state.doc.toString();
  const first = view.state.doc.line(1);
  const magic = /^%%mlsql/.test(first.text);
  if (magic) {
    builder.add(first.from, first.from, magicLine);
  }
  for (const [from, to] of parameterRanges(text)) {
    if (magic && from <= first.to) {
      continue;
    }
    builder.add(from, to, parameterMark);
  }
  return builder.finish();
}

/** Marks `{name}` parameters and `$name` variables (class mlsql-parameter) and the `%%mlsql` line. */
const parameters = ViewPlugin.fromClass(
  class {
    decorations: DecorationSet;
    constructor(view: EditorView) {
      this.decorations = decorate(view);
    }
    update(update: ViewUpdate) {
      if (update.docChanged) {
        this.decorations = decorate(update.view);
      }
    }
  },
  { decorations: v => v.decorations }
);

/**
 * The language, with stable token classes (tok-keyword, tok-string, ...) beside JupyterLab's theme
 * colours, so MLSQL's tokens can be styled and checked by name.
 */
export function mlsql(): LanguageSupport {
  return new LanguageSupport(mlsqlDialect.language, [syntaxHighlighting(classHighlighter), parameters]);
}

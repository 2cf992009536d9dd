/** From the 1-based line/column fields of an MLSQL error to offsets in the cell's text. */

export const ERROR_MIME = 'application/vnd.mlsql.error+json';

export interface IErrorPosition {
  message?: string;
  kind?: string;
  line?: number | null;
  column?: number | null;
  end_line?: number | null;
  end_column?: number | null;
}

export interface ISpan {
  from: number;
  to: number;
}

/** Offsets of each line start in `text`. */
function lineStarts(text: string): number[] {
  const starts = [0];
  for (let i = 0; i < text.length; i++) {
    if (text.charCodeAt(i) === 10) {
      starts.push(i + 1);
    }
  }
  return starts;
}

function offset(text: string, starts: number[], line: number, column: number): number {
  const l = Math.min(Math.max(line, 1), starts.length) - 1;
  const lineEnd = l + 1 < starts.length ? starts[l + 1] - 1 : text.length;
  return Math.min(starts[l] + Math.max(column, 1) - 1, lineEnd);
}

/**
 * The span [from, to) an error marks in `text`: positions are 1-based, relative to the whole
 * cell source, the end exclusive (a missing end marks one character). Positions past a line's
 * end are clamped to it; a span that would be empty grows to the word (or character) at `from`.
 * Null when the error has no position.
 */
export function errorSpan(text: string, pos: IErrorPosition): ISpan | null {
  if (!pos || typeof pos.line !== 'number' || pos.line < 1) {
    return null;
  }
  const starts = lineStarts(text);
  if (pos.line > starts.length) {
    return null;
  }
  const column = typeof pos.column === 'number' ? pos.column : 1;
  const from = offset(text, starts, pos.line, column);
  let to: number;
  if (typeof pos.end_line === 'number' && typeof pos.end_column === 'number') {
    to = offset(text, starts, pos.end_line, pos.end_column);
  } else {
    to = from + 1;
  }
  if (to <= from) {
    to = from;
    while (to < text.length && /\w/.test(text[to])) {
      to++;
    }
    if (to === from && from < text.length && text[from] !== '\n') {
      to = from + 1;
    }
  }
  return { from, to: Math.min(to, text.length) };
}

/** The short line the error renderer shows: "line 3, column 8" (or "line 3" without a column). */
export function positionLabel(pos: IErrorPosition): string {
  if (typeof pos.line !== 'number') {
    return '';
  }
  return typeof pos.column === 'number' ? `line ${pos.line}, column ${pos.column}` : `line ${pos.line}`;
}

/**
 * Which cells are MLSQL: a cell whose first line is the `%%mlsql` cell magic (with or without
 * options), in any notebook; every cell of a notebook running the MLSQL kernel.
 */

export const MLSQL_MIME = 'text/x-mlsql';

const CELL_MAGIC = /^%%mlsql(?:\s|$)/;

/** True when the cell's first line starts the `%%mlsql` cell magic. */
export function isMlsqlCell(source: string): boolean {
  const nl = source.indexOf('\n');
  const first = nl < 0 ? source : source.slice(0, nl);
  return CELL_MAGIC.test(first);
}

/** The first line of a source (what the mimetype switch watches). */
export function firstLine(source: string): string {
  const nl = source.indexOf('\n');
  return nl < 0 ? source : source.slice(0, nl);
}

/** The mimetype a code cell should have: MLSQL for a `%%mlsql` cell or an MLSQL-kernel notebook, else the notebook's. */
export function cellMimeType(source: string, notebookMime: string, mlsqlKernel: boolean): string {
  return mlsqlKernel || isMlsqlCell(source) ? MLSQL_MIME : notebookMime;
}

/** Whether a kernel (by its kernelspec name or language_info) is the MLSQL kernel. */
export function isMlsqlKernel(specName?: string | null, languageInfo?: { name?: string; mimetype?: string } | null): boolean {
  if (specName && /^mlsql/i.test(specName)) {
    return true;
  }
  return !!languageInfo && (languageInfo.mimetype === MLSQL_MIME || languageInfo.name === 'mlsql');
}

const CREATE_MODEL = /\bCREATE\s+(?:OR\s+REPLACE\s+)?MODEL\s+(?:IF\s+NOT\s+EXISTS\s+)?([A-Za-z_][\w.]*|"[^"]+"|`[^`]+`)/i;

/** The model a cell creates (`CREATE [OR REPLACE] MODEL name ...`), or null: the Deploy dialog preselects it. */
export function modelCreatedBy(source: string): string | null {
  const clean = source.replace(/--[^\n]*/g, '').replace(/\/\*[\s\S]*?\*\//g, '');
  const m = CREATE_MODEL.exec(clean);
  if (!m) {
    return null;
  }
  const name = m[1];
  return /^["`]/.test(name) ? name.slice(1, -1) : name;
}

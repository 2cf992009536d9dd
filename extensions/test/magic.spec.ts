import { cellMimeType, isMlsqlCell, isMlsqlKernel, modelCreatedBy, MLSQL_MIME } from '../src/logic/magic';

describe('%%mlsql detection', () => {
  it('sees the cell magic on the first line only', () => {
    expect(isMlsqlCell('%%mlsql\nSELECT 1')).toBe(true);
    expect(isMlsqlCell('%%mlsql --limit 5\nSELECT 1')).toBe(true);
    expect(isMlsqlCell('%%mlsql')).toBe(true);
    expect(isMlsqlCell('x = 1\n%%mlsql\nSELECT 1')).toBe(false);
    expect(isMlsqlCell('%%mlsqlx\nSELECT 1')).toBe(false);
    expect(isMlsqlCell(' %%mlsql\nSELECT 1')).toBe(false);
    expect(isMlsqlCell('%mlsql SELECT 1')).toBe(false);
    expect(isMlsqlCell('')).toBe(false);
  });

  it('switches the mimetype both ways', () => {
    expect(cellMimeType('%%mlsql\nSELECT 1', 'text/x-ipython', false)).toBe(MLSQL_MIME);
    expect(cellMimeType('print(1)', 'text/x-ipython', false)).toBe('text/x-ipython');
    expect(cellMimeType('SELECT 1', 'text/x-sql', true)).toBe(MLSQL_MIME);
  });

  it('knows the MLSQL kernel by spec name or language_info', () => {
    expect(isMlsqlKernel('mlsql', null)).toBe(true);
    expect(isMlsqlKernel('python3', { name: 'python', mimetype: 'text/x-python' })).toBe(false);
    expect(isMlsqlKernel(undefined, { name: 'mlsql' })).toBe(true);
    expect(isMlsqlKernel(undefined, { mimetype: 'text/x-mlsql' })).toBe(true);
  });

  it('finds the model a cell creates', () => {
    expect(modelCreatedBy("%%mlsql\nCREATE MODEL species OPTIONS (model_type='logistic_reg') AS SELECT 1")).toBe('species');
    expect(modelCreatedBy('create or replace model  mass_model\nAS SELECT 1')).toBe('mass_model');
    expect(modelCreatedBy('CREATE MODEL IF NOT EXISTS m2 AS SELECT 1')).toBe('m2');
    expect(modelCreatedBy('-- CREATE MODEL old\nSELECT 1')).toBeNull();
    expect(modelCreatedBy('SELECT * FROM ML.PREDICT(MODEL species, TABLE t)')).toBeNull();
  });
});

import { errorSpan, positionLabel } from '../src/logic/errorspan';

const cell = '%%mlsql\nSELECT species,\n       bil_length\nFROM penguins';

describe('error span from line/column', () => {
  it('maps 1-based whole-cell positions to offsets (end exclusive)', () => {
    const span = errorSpan(cell, { line: 3, column: 8, end_line: 3, end_column: 18 })!;
    expect(cell.slice(span.from, span.to)).toBe('bil_length');
  });

  it('spans lines', () => {
    const span = errorSpan(cell, { line: 2, column: 8, end_line: 4, end_column: 5 })!;
    expect(cell.slice(span.from, span.to)).toBe('species,\n       bil_length\nFROM');
  });

  it('grows an empty or missing end to the word at the start', () => {
    expect(cell.slice(...Object.values(errorSpan(cell, { line: 4, column: 6 })!) as [number, number])).toBe('p');
    const s = errorSpan(cell, { line: 4, column: 6, end_line: 4, end_column: 6 })!;
    expect(cell.slice(s.from, s.to)).toBe('penguins');
  });

  it('clamps positions past a line end and refuses lines past the text', () => {
    const s = errorSpan(cell, { line: 2, column: 50, end_line: 2, end_column: 60 })!;
    expect(s.from).toBe(cell.indexOf('\n', 8));
    expect(errorSpan(cell, { line: 9, column: 1 })).toBeNull();
    expect(errorSpan(cell, { line: null, column: null })).toBeNull();
  });

  it('labels the position the way the output shows it', () => {
    expect(positionLabel({ line: 3, column: 8 })).toBe('line 3, column 8');
    expect(positionLabel({ line: 3 })).toBe('line 3');
    expect(positionLabel({})).toBe('');
  });
});

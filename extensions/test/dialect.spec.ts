import { builtinList, keywordList, ML_FUNCTIONS, parameterRanges, typeList } from '../src/logic/dialect';

describe('MLSQL word lists', () => {
  const keywords = keywordList().split(' ');
  const builtins = builtinList().split(' ');

  it('holds DuckDB SQL and the ML statements, lower case, once each', () => {
    for (const w of ['select', 'from', 'group', 'order', 'all', 'qualify', 'pivot', 'summarize', 'asof', 'in']) {
      expect(keywords).toContain(w);
    }
    for (const w of ['model', 'deploy', 'device', 'export', 'rollback', 'transform', 'options', 'job', 'notebook']) {
      expect(keywords).toContain(w);
    }
    expect(new Set(keywords).size).toBe(keywords.length);
    expect(keywords.every(w => w === w.toLowerCase() && /^[a-z_]+$/.test(w))).toBe(true);
  });

  it('has every ML.* function and ml itself as builtins', () => {
    expect(builtins).toContain('ml');
    for (const f of ML_FUNCTIONS) {
      expect(builtins).toContain(f.toLowerCase());
    }
    expect(ML_FUNCTIONS).toEqual(expect.arrayContaining(['PREDICT', 'EVALUATE', 'FEATURE_IMPORTANCE', 'DEVICE_METRICS']));
    expect(builtins).toContain('read_parquet');
    expect(typeList().split(' ')).toEqual(expect.arrayContaining(['varchar', 'double', 'hugeint', 'struct']));
  });

  it('finds {name} parameters and $name variables, not in comments', () => {
    const sql = "SELECT * FROM t WHERE x > {threshold} AND y = $limit -- {not_this}\nAND z = '{path}' /* $nope */";
    const found = parameterRanges(sql).map(([a, b]) => sql.slice(a, b));
    expect(found).toEqual(['{threshold}', '$limit', '{path}']);
    expect(parameterRanges('SELECT {1}, {a b}')).toEqual([]);
  });
});

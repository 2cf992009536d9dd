// The extension's MLSQL words are Python's: every list it highlights, offers or checks equals the one
// `python -m mlsql.language.vocabulary` generated (src/generated/vocabulary.json, written by
// `jlpm build:vocabulary`, which `jlpm test` runs first), and no hand copy is left in src/.
import * as fs from 'fs';
import * as path from 'path';

import {
  buildDeployBody,
  DEFAULT_PROVIDERS,
  DEFAULT_QUANTIZE,
  PROVIDERS,
  QUANTIZE
} from '../src/logic/deploy';
import { builtinList, keywordList, ML_FUNCTIONS, ML_KEYWORDS, ML_NAMESPACE } from '../src/logic/dialect';
import { option, VOCABULARY } from '../src/logic/vocabulary';

const SRC = path.join(__dirname, '..', 'src');
const generated = JSON.parse(fs.readFileSync(path.join(SRC, 'generated', 'vocabulary.json'), 'utf8'));

function deployOption(name: string) {
  const o = generated.options['DEPLOY MODEL'].find((x: { name: string }) => x.name === name);
  expect(o).toBeDefined();
  return o;
}

describe('the vocabulary generated from Python', () => {
  it('is what the extension reads', () => {
    expect(VOCABULARY).toEqual(generated);
    expect(generated._generated_by).toContain('mlsql.language.vocabulary');
  });

  it('gives the dialect its MLSQL keywords and ML.* functions', () => {
    expect(ML_KEYWORDS).toEqual(generated.keywords.map((w: string) => w.toLowerCase()));
    expect(ML_FUNCTIONS).toEqual(Object.keys(generated.functions));
    expect(ML_NAMESPACE).toBe(generated.namespace.toLowerCase());
    const keywords = keywordList().split(' ');
    for (const w of generated.keywords) {
      expect(keywords).toContain(w.toLowerCase());
    }
    const builtins = builtinList().split(' ');
    for (const f of Object.keys(generated.functions)) {
      expect(builtins).toContain(f.toLowerCase());
    }
    // the words that were hand-copied before, still there
    expect(ML_KEYWORDS).toEqual(expect.arrayContaining(['model', 'models', 'deploy', 'device', 'devices', 'job', 'jobs',
      'notebook', 'rollback', 'mlsql', 'run', 'transform', 'options']));
    expect(ML_FUNCTIONS).toEqual(expect.arrayContaining(['PREDICT', 'EVALUATE', 'DEVICE_METRICS', 'JOB_RUNS',
      'STANDARD_SCALER', 'ONE_HOT_ENCODER']));
  });

  it("gives the deploy dialog DEPLOY MODEL's quantize values and providers, with their defaults", () => {
    const quantize = deployOption('quantize');
    const providers = deployOption('providers');
    expect(QUANTIZE).toEqual(quantize.choices);
    expect(QUANTIZE).toEqual(generated.values.quantize);
    expect(DEFAULT_QUANTIZE).toBe(quantize.default);
    expect(PROVIDERS).toEqual(providers.values);
    expect(PROVIDERS).toEqual(generated.values.providers);
    expect(DEFAULT_PROVIDERS).toEqual(providers.default);
    expect(option('DEPLOY MODEL', 'quantize')).toEqual(quantize);
    expect(() => option('DEPLOY MODEL', 'no_such_option')).toThrow('no option no_such_option of DEPLOY MODEL');
  });

  it('lets a deploy body take every value Python allows, and only those', () => {
    const base = { model: 'm', version: null, target: 'device:d', providers: [] as string[], quantize: null as string | null };
    for (const q of generated.values.quantize as string[]) {
      expect(buildDeployBody({ ...base, quantize: q }).quantize).toBe(q);
    }
    const all = generated.values.providers as string[];
    expect(buildDeployBody({ ...base, providers: all }).providers).toEqual(all);
    expect(() => buildDeployBody({ ...base, quantize: 'int4' })).toThrow(`choose ${generated.values.quantize.join(', ')}.`);
    expect(() => buildDeployBody({ ...base, providers: ['gpu'] })).toThrow(`choose among ${all.join(', ')}.`);
  });

  it('is not copied by hand anywhere in src/', () => {
    const files: string[] = [];
    const walk = (dir: string) => {
      for (const e of fs.readdirSync(dir, { withFileTypes: true })) {
        const p = path.join(dir, e.name);
        if (e.isDirectory() && e.name !== 'generated') {
          walk(p);
        } else if (e.isFile() && p.endsWith('.ts')) {
          files.push(p);
        }
      }
    };
    walk(SRC);
    expect(files.length).toBeGreaterThan(5);
    // quoted as a string literal: a quantize value (but 'none', a word of its own), a provider, an ML function
    const values = [...generated.values.quantize, ...generated.values.providers, ...Object.keys(generated.functions)]
      .filter((v: string) => v !== 'none');
    const copies: string[] = [];
    for (const f of files) {
      const text = fs.readFileSync(f, 'utf8');
      for (const v of values) {
        if (new RegExp(`['"\`]${v}['"\`]`, 'i').test(text)) {
          copies.push(`${path.relative(SRC, f)}: '${v}'`);
        }
      }
    }
    expect(copies).toEqual([]);
  });
});

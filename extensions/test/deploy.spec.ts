import { buildDeployBody, DeployChoiceError, deploySummary, formatParity, formatPlacement, parityNote } from '../src/logic/deploy';

describe('deploy body', () => {
  it('builds the POST body for a device or a group', () => {
    expect(buildDeployBody({ model: 'species', version: 2, target: 'device:local', providers: ['cuda', 'cpu'], quantize: 'int8' })).toEqual({
      model: 'species', version: 2, device: 'local', group: null, providers: ['cuda', 'cpu'], quantize: 'int8'
    });
    expect(buildDeployBody({ model: ' species ', version: null, target: 'group:edge', providers: [], quantize: null })).toEqual({
      model: 'species', version: null, device: null, group: 'edge', providers: null, quantize: null
    });
  });

  it('says what is missing or wrong', () => {
    const base = { model: 'm', version: null, target: 'device:d', providers: [], quantize: null };
    expect(() => buildDeployBody({ ...base, model: '' })).toThrow(new DeployChoiceError('Choose a model to deploy.'));
    expect(() => buildDeployBody({ ...base, target: null })).toThrow('Choose a device or a group');
    expect(() => buildDeployBody({ ...base, version: 0 })).toThrow('Version 0 is not a version number.');
    expect(() => buildDeployBody({ ...base, providers: ['gpu'] })).toThrow('Unknown provider gpu');
    expect(() => buildDeployBody({ ...base, quantize: 'int4' })).toThrow('Unknown quantization int4');
    expect(() => buildDeployBody({ ...base, target: 'host:x' })).toThrow('Unknown target host:x');
  });

  it('summarises placement, parity and the outcome', () => {
    expect(formatPlacement({ CPUExecutionProvider: 12, CUDAExecutionProvider: 30 })).toBe('CUDA 30 nodes, CPU 12 nodes');
    expect(formatParity({ passed: true, metric: 'accuracy', native: 0.98551, onnx: 0.98551, quantized: null })).toBe(
      'passed (accuracy: native 0.9855, onnx 0.9855)'
    );
    expect(formatParity(null)).toBe('not checked');
    // the rows the gate's metric is computed on are named: not ML.EVALUATE's held-out rows
    const parity = { passed: true, metric: 'roc_auc', native: 0.82019, onnx: 0.82019, quantized: null, rows: 344, rows_from: 'training query' };
    expect(formatParity(parity)).toBe('passed (roc_auc on 344 rows of the training query: native 0.8202, onnx 0.8202)');
    expect(parityNote(parity, { rows: 69, held_out: true })).toBe(
      "The parity gate's roc_auc is computed on rows of the training query, training rows included; " +
        "the version's metrics (ML.EVALUATE) are computed on its 69 held-out rows, so the two can differ."
    );
    expect(parityNote(parity, { rows: 344, held_out: false })).toBe(''); // no held-out split: the same rows
    expect(parityNote(parity)).toContain('computed on its held-out rows');
    expect(parityNote({ passed: true, metric: 'roc_auc', native: 0.9 })).toBe('');
    expect(deploySummary({ id: '1', state: 'failed', steps: [], result: null, error: 'device offline' })).toBe('Deploy failed: device offline');
    expect(deploySummary({ id: '1', state: 'running', steps: [{ t: 1, message: 'exporting' }], result: null, error: null })).toBe('exporting');
    expect(deploySummary({ id: '1', state: 'done', steps: [], result: { version: 2, device: 'local' }, error: null })).toBe('Deployed v2 to local');
  });
});

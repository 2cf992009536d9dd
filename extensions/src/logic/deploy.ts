/** The Deploy dialog's choices, checked and turned into the body of POST /mlsql/api/deploys. */
import { option } from './vocabulary';

const QUANTIZE_OPTION = option('DEPLOY MODEL', 'quantize');
const PROVIDERS_OPTION = option('DEPLOY MODEL', 'providers');

/** DEPLOY MODEL's quantize values and default, as Python declares them (mlsql.language.options). */
export const QUANTIZE: readonly string[] = QUANTIZE_OPTION.choices;
export const DEFAULT_QUANTIZE = String(QUANTIZE_OPTION.default);
export const QUANTIZE_DOC = QUANTIZE_OPTION.doc;
export type Quantize = string;

/** Execution providers a user may ask for, in the order Python lists them (the agent keeps those it has),
 * and DEPLOY MODEL's default preference. */
export const PROVIDERS: readonly string[] = PROVIDERS_OPTION.values ?? [];
export const DEFAULT_PROVIDERS: readonly string[] = Array.isArray(PROVIDERS_OPTION.default) ? (PROVIDERS_OPTION.default as string[]) : [];
export const PROVIDERS_DOC = PROVIDERS_OPTION.doc;

export interface IDeployChoice {
  model: string;
  version: number | null;
  /** "device:<name>" or "group:<name>" (the dialog's target list), or null for the model's default. */
  target: string | null;
  providers: string[];
  quantize: string | null;
}

export interface IDeployBody {
  model: string;
  version: number | null;
  device: string | null;
  group: string | null;
  providers: string[] | null;
  quantize: Quantize | null;
}

export class DeployChoiceError extends Error {}

/** The POST body for a choice; throws DeployChoiceError saying what is missing or wrong. */
export function buildDeployBody(choice: IDeployChoice): IDeployBody {
  const model = (choice.model || '').trim();
  if (!model) {
    throw new DeployChoiceError('Choose a model to deploy.');
  }
  if (choice.version !== null && (!Number.isInteger(choice.version) || choice.version < 1)) {
    throw new DeployChoiceError(`Version ${choice.version} is not a version number.`);
  }
  let device: string | null = null;
  let group: string | null = null;
  if (choice.target) {
    const m = /^(device|group):(.+)$/.exec(choice.target);
    if (!m) {
      throw new DeployChoiceError(`Unknown target ${choice.target}: choose a device or a group.`);
    }
    if (m[1] === 'device') {
      device = m[2];
    } else {
      group = m[2];
    }
  } else {
    throw new DeployChoiceError('Choose a device or a group to deploy to.');
  }
  const unknown = choice.providers.filter(p => !PROVIDERS.includes(p));
  if (unknown.length) {
    throw new DeployChoiceError(`Unknown provider ${unknown.join(', ')}: choose among ${PROVIDERS.join(', ')}.`);
  }
  let quantize: Quantize | null = null;
  if (choice.quantize) {
    if (!QUANTIZE.includes(choice.quantize)) {
      throw new DeployChoiceError(`Unknown quantization ${choice.quantize}: choose ${QUANTIZE.join(', ')}.`);
    }
    quantize = choice.quantize;
  }
  return {
    model,
    version: choice.version,
    device,
    group,
    providers: choice.providers.length ? [...choice.providers] : null,
    quantize
  };
}

export interface IDeployResult {
  version?: number;
  device?: string;
  placement?: Record<string, number>;
  first_inference_ms?: number | null;
  parity?: IParity | null;
}

/** The export's parity report as the server gives it (GET /mlsql/api/deploys/<id>). */
export interface IParity {
  passed: boolean;
  metric?: string;
  native?: number | null;
  onnx?: number | null;
  quantized?: number | null;
  /** how many rows the figures are computed on, and which ("training query": a sample of the model's training query) */
  rows?: number | null;
  rows_from?: string | null;
}

export interface IDeployStatus {
  id: string;
  state: 'running' | 'done' | 'failed';
  steps: Array<{ t: string | number; message: string }>;
  result: IDeployResult | null;
  error: string | null;
}

/** "CPUExecutionProvider 12 nodes, CUDAExecutionProvider 3 nodes" (the biggest share first). */
export function formatPlacement(placement: Record<string, number> | undefined): string {
  if (!placement || !Object.keys(placement).length) {
    return '—';
  }
  return Object.entries(placement)
    .sort((a, b) => b[1] - a[1])
    .map(([p, n]) => `${p.replace(/ExecutionProvider$/, '')} ${n} node${n === 1 ? '' : 's'}`)
    .join(', ');
}

/** Which rows the parity figures are computed on: "344 rows of the training query" ('' when unknown). */
export function parityRows(parity: IDeployResult['parity']): string {
  if (!parity || typeof parity.rows !== 'number') {
    return '';
  }
  return `${parity.rows} row${parity.rows === 1 ? '' : 's'}${parity.rows_from ? ` of the ${parity.rows_from}` : ''}`;
}

/** The parity gate's verdict in one line, with the rows it was computed on:
 * "passed (roc_auc on 344 rows of the training query: native 0.91, onnx 0.91)". */
export function formatParity(parity: IDeployResult['parity']): string {
  if (!parity) {
    return 'not checked';
  }
  const parts = (['native', 'onnx', 'quantized'] as const)
    .filter(k => typeof parity[k] === 'number')
    .map(k => `${k} ${Number((parity[k] as number).toPrecision(4))}`);
  const rows = parityRows(parity);
  const what = [parity.metric, rows && `on ${rows}`].filter(Boolean).join(' ');
  const detail = parts.length ? ` (${what ? `${what}: ` : ''}${parts.join(', ')})` : '';
  return `${parity.passed ? 'passed' : 'FAILED'}${detail}`;
}

/** Why the parity metric need not match ML.EVALUATE's: it is computed on other rows. '' when the
 * rows are not known, or when the version's metrics are on the training rows too (no held-out
 * split). `evaluated`: the rows the version's registered metrics were computed on. */
export function parityNote(parity: IDeployResult['parity'], evaluated: { rows: number; held_out: boolean } | null = null): string {
  if (!parity || parity.rows_from !== 'training query' || !parity.metric || (evaluated && !evaluated.held_out)) {
    return '';
  }
  const heldOut = evaluated ? `its ${evaluated.rows} held-out rows` : 'its held-out rows';
  return (
    `The parity gate's ${parity.metric} is computed on rows of the training query, training rows included; ` +
    `the version's metrics (ML.EVALUATE) are computed on ${heldOut}, so the two can differ.`
  );
}

/** The dialog's summary of a finished deploy. */
export function deploySummary(status: IDeployStatus): string {
  if (status.state === 'failed') {
    return `Deploy failed: ${status.error || 'no reason given'}`;
  }
  if (status.state !== 'done' || !status.result) {
    return status.steps.length ? status.steps[status.steps.length - 1].message : 'Deploying…';
  }
  const r = status.result;
  return `Deployed v${r.version ?? '?'} to ${r.device ?? '?'}`;
}

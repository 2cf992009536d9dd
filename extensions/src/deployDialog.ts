/**
 * The Deploy dialog: registered models (versions, metrics), devices and groups with their live
 * status, providers and quantization, a Deploy button; then the deploy's progress (polled) and
 * its result (placement per provider, first-inference latency, parity verdict) or its error.
 */
import { Dialog } from '@jupyterlab/apputils';
import { Signal } from '@lumino/signaling';
import { Widget } from '@lumino/widgets';

import { api } from './api';
import {
  buildDeployBody,
  DEFAULT_PROVIDERS,
  DEFAULT_QUANTIZE,
  DeployChoiceError,
  deploySummary,
  formatParity,
  formatPlacement,
  IDeployStatus,
  parityNote,
  PROVIDERS,
  PROVIDERS_DOC,
  QUANTIZE,
  QUANTIZE_DOC
} from './logic/deploy';
import { activeModels, formatMetrics, formatMs, IDevice, IGroup, IModel, metricsOn } from './logic/format';

/** Deploys started in this browser session: the side panel lists them. */
export class DeployLog {
  readonly changed = new Signal<this, IDeployStatus>(this);
  readonly entries = new Map<string, { model: string; target: string; status: IDeployStatus }>();

  update(model: string, target: string, status: IDeployStatus): void {
    this.entries.set(status.id, { model, target, status });
    this.changed.emit(status);
  }
}

function el<K extends keyof HTMLElementTagNameMap>(tag: K, props: Partial<HTMLElementTagNameMap[K]> = {}, ...children: (Node | string)[]) {
  const node = document.createElement(tag);
  Object.assign(node, props);
  for (const c of children) {
    node.append(c);
  }
  return node;
}

const POLL_MS = 500;

export class DeployBody extends Widget {
  private models: IModel[] = [];
  private devices: IDevice[] = [];
  private groups: IGroup[] = [];
  private modelSelect = el('select', { className: 'mlsql-deploy-model' });
  private versionSelect = el('select', { className: 'mlsql-deploy-version' });
  private targetSelect = el('select', { className: 'mlsql-deploy-target' });
  private quantizeSelect = el('select', { className: 'mlsql-deploy-quantize' });
  private providerBoxes = new Map<string, HTMLInputElement>();
  private metrics = el('div', { className: 'mlsql-deploy-metrics' });
  private targetStatus = el('div', { className: 'mlsql-deploy-target-status' });
  private deployButton = el('button', { className: 'jp-Button jp-mod-accept mlsql-deploy-button', textContent: 'Deploy' });
  private progress = el('ol', { className: 'mlsql-deploy-steps' });
  private outcome = el('div', { className: 'mlsql-deploy-outcome' });
  private deployedModel = '';

  constructor(private log: DeployLog, private preselect: string | null) {
    super();
    this.addClass('mlsql-deploy');
    const providers = el('div', { className: 'mlsql-deploy-providers' });
    // the providers and quantizations DEPLOY MODEL takes, its defaults checked (mlsql.language.options)
    for (const p of PROVIDERS) {
      const box = el('input', { type: 'checkbox', value: p, checked: DEFAULT_PROVIDERS.includes(p) });
      this.providerBoxes.set(p, box);
      providers.append(el('label', {}, box, ` ${p}`));
    }
    for (const q of QUANTIZE) {
      this.quantizeSelect.append(el('option', { value: q, textContent: q === 'none' ? 'none (float32)' : q }));
    }
    this.quantizeSelect.value = DEFAULT_QUANTIZE;
    this.node.append(
      el('label', { className: 'mlsql-field' }, 'Model', this.modelSelect),
      el('label', { className: 'mlsql-field' }, 'Version', this.versionSelect),
      this.metrics,
      el('label', { className: 'mlsql-field' }, 'Target', this.targetSelect),
      this.targetStatus,
      el('div', { className: 'mlsql-field', title: PROVIDERS_DOC }, 'Providers', providers),
      el('label', { className: 'mlsql-field', title: QUANTIZE_DOC }, 'Quantize', this.quantizeSelect),
      this.deployButton,
      this.outcome,
      this.progress
    );
    this.modelSelect.onchange = () => this.fillVersions();
    this.versionSelect.onchange = () => this.showMetrics();
    this.targetSelect.onchange = () => this.showTarget();
    this.deployButton.onclick = () => void this.deploy();
    void this.load();
  }

  private async load(): Promise<void> {
    this.outcome.textContent = 'Loading models and devices…';
    try {
      const [m, d] = await Promise.all([api.models(), api.devices()]);
      this.models = m.models;
      this.devices = d.devices;
      this.groups = d.groups;
    } catch (e) {
      this.outcome.textContent = `Could not reach the MLSQL server extension: ${(e as Error).message}`;
      this.outcome.className = 'mlsql-deploy-outcome mlsql-failed';
      return;
    }
    this.outcome.textContent = '';
    this.modelSelect.replaceChildren(
      ...this.models.map(m => el('option', { value: m.name, textContent: m.model_type ? `${m.name} (${m.model_type})` : m.name }))
    );
    if (this.preselect && this.models.some(m => m.name === this.preselect)) {
      this.modelSelect.value = this.preselect;
    }
    this.fillTargets();
    const online = this.devices.find(d => d.online);
    if (online) {
      this.targetSelect.value = `device:${online.name}`;
    }
    if (!this.models.length) {
      this.outcome.textContent = 'No registered models yet: CREATE MODEL first.';
    } else if (!this.devices.length && !this.groups.length) {
      this.outcome.textContent = "No devices: CREATE DEVICE 'name' OPTIONS (url = ..., token = ...) first.";
    }
    this.fillVersions();
    this.showTarget();
  }

  /** The target list from this.devices and this.groups, keeping the chosen target. */
  private fillTargets(): void {
    const chosen = this.targetSelect.value;
    this.targetSelect.replaceChildren(
      ...this.devices.map(d =>
        el('option', {
          value: `device:${d.name}`,
          textContent: `${d.name} — ${d.online ? 'online' : 'offline'}${activeModels(d) ? `, runs ${activeModels(d)}` : ''}`
        })
      ),
      ...this.groups.map(g => el('option', { value: `group:${g.name}`, textContent: `group ${g.name} (${g.devices.length} devices)` }))
    );
    if (chosen && Array.from(this.targetSelect.options).some(o => o.value === chosen)) {
      this.targetSelect.value = chosen;
    }
  }

  /** Read the devices' live state again (a finished deploy changes what they run). */
  private async refreshTargets(): Promise<void> {
    try {
      const d = await api.devices();
      this.devices = d.devices;
      this.groups = d.groups;
    } catch {
      return; // the outcome already says how the deploy ended; the old status stays
    }
    if (!this.isDisposed) {
      this.fillTargets();
      this.showTarget();
    }
  }

  private fillVersions(): void {
    const model = this.models.find(m => m.name === this.modelSelect.value);
    const versions = model ? [...model.versions].sort((a, b) => b.version - a.version) : [];
    this.versionSelect.replaceChildren(
      el('option', { value: '', textContent: 'latest' }),
      ...versions.map(v =>
        el('option', { value: String(v.version), textContent: `v${v.version}${v.aliases?.length ? ` (${v.aliases.join(', ')})` : ''}` })
      )
    );
    this.showMetrics();
  }

  private showMetrics(): void {
    const model = this.models.find(m => m.name === this.modelSelect.value);
    if (!model || !model.versions.length) {
      this.metrics.textContent = '';
      return;
    }
    const wanted = this.versionSelect.value ? Number(this.versionSelect.value) : Math.max(...model.versions.map(v => v.version));
    const v = model.versions.find(x => x.version === wanted);
    const on = v ? metricsOn(v) : '';
    this.metrics.textContent = v ? `${formatMetrics(v.metrics, 4) || 'no metrics'}${on ? ` (${on})` : ''}` : '';
  }

  private showTarget(): void {
    const [kind, name] = this.targetSelect.value.split(/:(.*)/s);
    if (kind === 'device') {
      const d = this.devices.find(x => x.name === name);
      this.targetStatus.textContent = d
        ? `${d.online ? '● online' : '○ offline'} · ${activeModels(d) ? `active ${activeModels(d)}` : 'nothing deployed'}` +
          `${d.providers?.length ? ` · providers ${d.providers.join(', ')}` : ''}${d.error ? ` · ${d.error}` : ''}`
        : '';
      this.targetStatus.className = `mlsql-deploy-target-status ${d?.online ? 'mlsql-online' : 'mlsql-offline'}`;
    } else if (kind === 'group') {
      const g = this.groups.find(x => x.name === name);
      this.targetStatus.textContent = g ? `devices: ${g.devices.join(', ') || 'none'}` : '';
      this.targetStatus.className = 'mlsql-deploy-target-status';
    } else {
      this.targetStatus.textContent = '';
    }
  }

  private async deploy(): Promise<void> {
    let body;
    try {
      body = buildDeployBody({
        model: this.modelSelect.value,
        version: this.versionSelect.value ? Number(this.versionSelect.value) : null,
        target: this.targetSelect.value || null,
        providers: [...this.providerBoxes.values()].filter(b => b.checked).map(b => b.value),
        quantize: this.quantizeSelect.value
      });
    } catch (e) {
      if (e instanceof DeployChoiceError) {
        this.outcome.textContent = e.message;
        this.outcome.className = 'mlsql-deploy-outcome mlsql-failed';
        return;
      }
      throw e;
    }
    const target = body.device ?? `group ${body.group}`;
    this.deployedModel = body.model;
    this.deployButton.disabled = true;
    this.progress.replaceChildren();
    this.outcome.className = 'mlsql-deploy-outcome';
    this.outcome.textContent = `Deploying ${body.model} to ${target}…`;
    let status: IDeployStatus;
    try {
      const { id } = await api.deploy(body);
      status = { id, state: 'running', steps: [], result: null, error: null };
      this.log.update(body.model, target, status);
      // polled to the end even after the dialog closes: the panel's Deploys list follows it
      for (;;) {
        status = await api.deployStatus(id);
        this.log.update(body.model, target, status);
        if (!this.isDisposed) {
          this.showProgress(status);
        }
        if (status.state !== 'running') {
          break;
        }
        await new Promise(r => setTimeout(r, POLL_MS));
      }
    } catch (e) {
      this.outcome.textContent = `Deploy failed: ${(e as Error).message}`;
      this.outcome.className = 'mlsql-deploy-outcome mlsql-failed';
    } finally {
      this.deployButton.disabled = false;
    }
    if (!this.isDisposed) {
      await this.refreshTargets();
    }
  }

  private showProgress(status: IDeployStatus): void {
    this.progress.replaceChildren(...status.steps.map(s => el('li', { textContent: s.message })));
    // the list grows up to its max height, then scrolls: keep the newest step in view
    this.progress.scrollTop = this.progress.scrollHeight;
    this.outcome.replaceChildren(el('div', { className: 'mlsql-deploy-summary', textContent: deploySummary(status) }));
    if (status.state === 'done' && status.result) {
      const r = status.result;
      const table = el('table', { className: 'mlsql-deploy-result' });
      const rows: Array<[string, string]> = [
        ['Placement', formatPlacement(r.placement)],
        ['First inference', formatMs(r.first_inference_ms)],
        ['Parity gate', formatParity(r.parity)]
      ];
      for (const [k, v] of rows) {
        table.append(el('tr', {}, el('th', { textContent: k }), el('td', { textContent: v })));
      }
      this.outcome.append(table);
      const deployed = this.models
        .find(m => m.name === this.deployedModel)
        ?.versions.find(v => v.version === r.version);
      const note = parityNote(r.parity, deployed?.metrics_on ?? null);
      if (note) {
        this.outcome.append(el('div', { className: 'mlsql-deploy-note', textContent: note }));
      }
    }
    this.outcome.className = `mlsql-deploy-outcome ${status.state === 'done' ? 'mlsql-done' : status.state === 'failed' ? 'mlsql-failed' : ''}`;
    if (status.state !== 'running') {
      this.outcome.scrollIntoView({ block: 'nearest' });
    }
  }
}

export async function openDeployDialog(log: DeployLog, preselect: string | null): Promise<void> {
  const body = new DeployBody(log, preselect);
  const dialog = new Dialog({ title: 'Deploy a model', body, buttons: [Dialog.cancelButton({ label: 'Close' })] });
  dialog.addClass('mlsql-deploy-dialog'); // taller than JupyterLab's 500 px: the result and every step in view
  await dialog.launch();
}

/**
 * The MLSQL side panel: models (versions, metrics, aliases, devices, MLflow run link), devices
 * (online, active model/version, providers used, p95, error rate; refreshed every 2 s while the
 * panel is visible), deploys started here, jobs (next run, last status, output notebook) and alerts
 * (interval, last fired, last error).
 */
import { Message } from '@lumino/messaging';
import { Widget } from '@lumino/widgets';

import { api } from './api';
import { DeployLog } from './deployDialog';
import { deploySummary, formatPlacement } from './logic/deploy';
import { alertRows, deviceRows, jobRows, modelRows } from './logic/format';

const REFRESH_MS = 2000;

function el<K extends keyof HTMLElementTagNameMap>(tag: K, props: Partial<HTMLElementTagNameMap[K]> = {}, ...children: (Node | string)[]) {
  const node = document.createElement(tag);
  Object.assign(node, props);
  for (const c of children) {
    node.append(c);
  }
  return node;
}

export interface IPanelActions {
  deploy(): void;
  openNotebook(path: string): void;
}

export class MlsqlPanel extends Widget {
  private models = el('div', { className: 'mlsql-panel-models' });
  private devices = el('div', { className: 'mlsql-panel-devices' });
  private deploys = el('div', { className: 'mlsql-panel-deploys' });
  private jobs = el('div', { className: 'mlsql-panel-jobs' });
  private alerts = el('div', { className: 'mlsql-panel-alerts' });
  private status = el('div', { className: 'mlsql-panel-status' });
  private timer: number | null = null;
  private tick = 0;

  constructor(private log: DeployLog, private actions: IPanelActions) {
    super();
    this.id = 'mlsql-panel';
    this.addClass('mlsql-panel');
    this.title.caption = 'MLSQL: models, devices, jobs, alerts';
    const refresh = el('button', { className: 'jp-Button jp-mod-styled mlsql-panel-refresh', textContent: 'Refresh' });
    refresh.onclick = () => void this.refresh(true);
    const deploy = el('button', { className: 'jp-Button jp-mod-styled jp-mod-accept mlsql-panel-deploy', textContent: 'Deploy…' });
    deploy.onclick = () => this.actions.deploy();
    this.node.append(
      el('div', { className: 'mlsql-panel-header' }, el('h2', { textContent: 'MLSQL' }), deploy, refresh),
      this.status,
      el('h3', { textContent: 'Models' }),
      this.models,
      el('h3', { textContent: 'Devices' }),
      this.devices,
      el('h3', { textContent: 'Deploys' }),
      this.deploys,
      el('h3', { textContent: 'Jobs' }),
      this.jobs,
      el('h3', { textContent: 'Alerts' }),
      this.alerts
    );
    this.log.changed.connect((_, status) => {
      this.renderDeploys();
      if (status.state !== 'running') {
        void this.refresh(true); // a finished deploy changes the devices' active versions
      }
    });
    this.renderDeploys();
  }

  protected onAfterShow(msg: Message): void {
    void this.refresh(true);
    this.timer = window.setInterval(() => void this.refresh(false), REFRESH_MS);
  }

  protected onBeforeHide(msg: Message): void {
    this.stop();
  }

  dispose(): void {
    this.stop();
    super.dispose();
  }

  private stop(): void {
    if (this.timer !== null) {
      window.clearInterval(this.timer);
      this.timer = null;
    }
  }

  /** Devices every time; models, jobs and alerts on the first call, every 5th, and on demand. */
  async refresh(all: boolean): Promise<void> {
    if (!this.isVisible && !all) {
      return;
    }
    const full = all || this.tick++ % 5 === 0;
    try {
      const [d, m, j, a] = await Promise.all([
        api.devices(),
        full ? api.models() : null,
        full ? api.jobs() : null,
        full ? api.alerts() : null
      ]);
      this.renderDevices(d.devices);
      if (m) {
        this.renderModels(m.models);
      }
      if (j) {
        this.renderJobs(j.jobs);
      }
      if (a) {
        this.renderAlerts(a.alerts);
      }
      this.status.textContent = '';
      this.status.className = 'mlsql-panel-status';
    } catch (e) {
      this.status.textContent = `MLSQL server extension unreachable: ${(e as Error).message}`;
      this.status.className = 'mlsql-panel-status mlsql-failed';
    }
  }

  private renderModels(models: Parameters<typeof modelRows>[0]): void {
    const rows = modelRows(models);
    if (!rows.length) {
      this.models.replaceChildren(el('p', { className: 'mlsql-empty', textContent: 'No models yet (CREATE MODEL).' }));
      return;
    }
    this.models.replaceChildren(
      ...rows.map(r =>
        el(
          'details',
          { className: 'mlsql-model', open: rows.length <= 3 },
          el('summary', {}, el('span', { className: 'mlsql-name', textContent: r.label }), el('span', { className: 'mlsql-detail', textContent: ` ${r.detail}` })),
          el(
            'table',
            {},
            ...r.versions.map(v =>
              el(
                'tr',
                { className: 'mlsql-version' },
                el('td', { textContent: v.label }),
                el('td', { textContent: v.metrics, title: v.metricsOn ? `ML.EVALUATE ${v.metricsOn}` : '' }),
                el('td', { textContent: [v.aliases, v.devices && `on ${v.devices}`].filter(Boolean).join(' · ') }),
                el('td', {}, v.runUrl ? el('a', { href: v.runUrl, target: '_blank', rel: 'noopener', textContent: 'MLflow run' }) : '')
              )
            )
          )
        )
      )
    );
  }

  private renderDevices(devices: Parameters<typeof deviceRows>[0]): void {
    const rows = deviceRows(devices);
    if (!rows.length) {
      this.devices.replaceChildren(el('p', { className: 'mlsql-empty', textContent: "No devices (CREATE DEVICE 'name' OPTIONS (url = ...))." }));
      return;
    }
    // two short lines per device: the panel is narrow
    this.devices.replaceChildren(
      ...rows.map(r =>
        el(
          'div',
          { className: `mlsql-device mlsql-${r.status}`, title: r.title },
          el(
            'div',
            {},
            el('span', { className: 'mlsql-dot', textContent: r.status === 'online' ? '● ' : '○ ', title: r.status }),
            el('span', { className: 'mlsql-name', textContent: r.name }),
            ' ',
            el('span', { className: 'mlsql-active', textContent: r.active })
          ),
          el('div', { className: 'mlsql-detail', textContent: `${r.status} · providers ${r.providers} · p95 ${r.p95} · errors ${r.errors}` })
        )
      )
    );
  }

  private renderDeploys(): void {
    const entries = [...this.log.entries.values()].reverse();
    if (!entries.length) {
      this.deploys.replaceChildren(el('p', { className: 'mlsql-empty', textContent: 'None from this window yet.' }));
      return;
    }
    this.deploys.replaceChildren(
      ...entries.map(e => {
        const s = e.status;
        const detail = s.state === 'done' && s.result ? ` · ${formatPlacement(s.result.placement)}` : '';
        return el('div', { className: `mlsql-deploy-entry mlsql-${s.state}` }, `${e.model} → ${e.target}: ${deploySummary(s)}${detail}`);
      })
    );
  }

  private renderJobs(jobs: Parameters<typeof jobRows>[0]): void {
    const rows = jobRows(jobs);
    if (!rows.length) {
      this.jobs.replaceChildren(el('p', { className: 'mlsql-empty', textContent: 'No jobs (CREATE JOB).' }));
      return;
    }
    // short lines per job, like the devices: a table's five columns do not fit the sidebar
    this.jobs.replaceChildren(
      ...rows.map(r => {
        // the output notebook opens when it is under the server's root; else its path is shown
        const link = r.notebook
          ? el('a', { className: 'mlsql-job-output', href: '#', textContent: 'output', title: r.notebook, onclick: (ev: MouseEvent) => { ev.preventDefault(); this.actions.openNotebook(r.notebook!); } })
          : r.notebookFile
            ? el('span', { className: 'mlsql-detail mlsql-job-output', textContent: 'output', title: r.notebookFile })
            : null;
        return el(
          'div',
          { className: 'mlsql-job' },
          el('div', {}, el('span', { className: 'mlsql-name', textContent: r.name }), ...(link ? [' · ', link] : [])),
          el('div', { className: 'mlsql-job-last', textContent: `last: ${r.last}` }),
          el('div', { className: 'mlsql-detail mlsql-job-when', textContent: `${r.schedule} · next ${r.next}` })
        );
      })
    );
  }

  private renderAlerts(alerts: Parameters<typeof alertRows>[0]): void {
    const rows = alertRows(alerts);
    if (!rows.length) {
      this.alerts.replaceChildren(el('p', { className: 'mlsql-empty', textContent: 'No alerts (CREATE ALERT).' }));
      return;
    }
    this.alerts.replaceChildren(
      ...rows.map(r =>
        el(
          'div',
          { className: `mlsql-alert mlsql-alert-${r.state}`, title: r.title },
          el('div', {}, el('span', { className: 'mlsql-name', textContent: r.name }), el('span', { className: 'mlsql-detail', textContent: ` · last: ${r.last}` })),
          el('div', { className: 'mlsql-alert-last-fired', textContent: r.fired }),
          ...(r.error ? [el('div', { className: 'mlsql-alert-error mlsql-failed', textContent: r.error, title: r.error })] : []),
          el('div', { className: 'mlsql-detail mlsql-alert-when', textContent: r.when })
        )
      )
    );
  }
}

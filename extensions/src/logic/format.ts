/** Rows for the MLSQL side panel and the Deploy dialog, from the REST answers. */

export interface IModelVersion {
  version: number;
  created?: string | null;
  metrics?: Record<string, number | null>;
  aliases?: string[];
  run_id?: string | null;
  mlflow_run_url?: string | null;
  devices?: string[];
  /** the rows `metrics` were computed on: the held-out split, or the training rows when there was none */
  metrics_on?: { rows: number; held_out: boolean } | null;
}

export interface IModel {
  name: string;
  model_type?: string | null;
  versions: IModelVersion[];
}

export interface IDevice {
  name: string;
  url?: string;
  online: boolean;
  active_model?: string | null;
  active_version?: number | null;
  providers?: string[];
  p95_ms?: number | null;
  error_rate?: number | null;
  rows_per_s?: number | null;
  updated?: string | null;
  error?: string | null;
  /** every model active on the device (active_model is the one it serves most) */
  models?: Array<{ model: string; version: number }>;
}

/** What a device runs: "species@2, churn@1" (every active model, the busiest first), '' for none. */
export function activeModels(d: IDevice): string {
  const all = (d.models ?? []).map(m => `${m.model}@${m.version}`);
  const main = d.active_model ? `${d.active_model}@${d.active_version ?? '?'}` : '';
  return [main, ...all.filter(m => m !== main)].filter(Boolean).join(', ');
}

export interface IGroup {
  name: string;
  devices: string[];
}

export interface IJob {
  name: string;
  schedule?: string | null;
  next_run?: string | null;
  last_status?: string | null;
  last_run_at?: string | null;
  last_output_notebook?: string | null;
  /** the output notebook relative to the server's root (what JupyterLab opens), null outside it */
  last_output_notebook_path?: string | null;
  paused?: boolean;
}

export interface IAlert {
  name: string;
  /** the check interval, '5m' */
  every?: string | null;
  /** where it notifies, secrets masked by the server */
  notify?: string[];
  next_check?: string | null;
  last_checked?: string | null;
  /** ok | fired | cooldown | query_failed | skipped */
  last_status?: string | null;
  last_fired?: string | null;
  fired_count?: number;
  last_error?: string | null;
}

/** A number as people read it: 3 significant digits below 1000, thousands separated above. */
export function formatNumber(x: number | null | undefined): string {
  if (x === null || x === undefined || Number.isNaN(x)) {
    return '—';
  }
  if (!Number.isFinite(x)) {
    return x > 0 ? '∞' : '-∞';
  }
  const a = Math.abs(x);
  if (a >= 1000) {
    return Math.round(x).toLocaleString('en-US');
  }
  if (a === 0 || Number.isInteger(x)) {
    return String(x);
  }
  return String(Number(x.toPrecision(3)));
}

/** Which rows a version's metrics were computed on: "on 69 held-out rows", "on 344 training rows,
 * no held-out split", or '' when the server does not know. */
export function metricsOn(v: Pick<IModelVersion, 'metrics_on'>): string {
  const m = v.metrics_on;
  if (!m) {
    return '';
  }
  const rows = `${m.rows} ${m.held_out ? 'held-out' : 'training'} row${m.rows === 1 ? '' : 's'}`;
  return `on ${rows}${m.held_out ? '' : ', no held-out split'}`;
}

/** Metrics as "roc_auc 0.912 · log_loss 0.231", the first `max` of them. */
export function formatMetrics(metrics: Record<string, number | null> | undefined, max = 3): string {
  if (!metrics) {
    return '';
  }
  return Object.entries(metrics)
    .filter(([, v]) => typeof v === 'number')
    .slice(0, max)
    .map(([k, v]) => `${k} ${formatNumber(v)}`)
    .join(' · ');
}

export function formatMs(ms: number | null | undefined): string {
  return ms === null || ms === undefined ? '—' : `${formatNumber(ms)} ms`;
}

/** An error rate (0..1) as a percentage. */
export function formatRate(rate: number | null | undefined): string {
  if (rate === null || rate === undefined) {
    return '—';
  }
  return `${formatNumber(rate * 100)} %`;
}

/** "12 s ago", "3 min ago", "in 5 min", or the date for things further than a day away. */
export function relativeTime(iso: string | null | undefined, now: Date = new Date()): string {
  if (!iso) {
    return '—';
  }
  const t = new Date(iso);
  if (Number.isNaN(t.getTime())) {
    return iso;
  }
  const s = Math.round((t.getTime() - now.getTime()) / 1000);
  const a = Math.abs(s);
  let text: string;
  if (a < 60) {
    text = `${a} s`;
  } else if (a < 3600) {
    text = `${Math.round(a / 60)} min`;
  } else if (a < 86400) {
    text = `${Math.round(a / 3600)} h`;
  } else {
    return t.toISOString().slice(0, 16).replace('T', ' ');
  }
  return s < 0 ? `${text} ago` : `in ${text}`;
}

/** The newest version of a model (highest number), or null. */
export function latestVersion(model: IModel): IModelVersion | null {
  return model.versions.reduce<IModelVersion | null>((best, v) => (best === null || v.version > best.version ? v : best), null);
}

export interface IModelRow {
  name: string;
  label: string;
  detail: string;
  versions: Array<{ label: string; metrics: string; metricsOn: string; aliases: string; devices: string; runUrl: string | null }>;
}

/** One row per model for the panel: "species (boosted_tree_classifier) · 2 versions", then its versions newest first. */
export function modelRows(models: IModel[]): IModelRow[] {
  return [...models]
    .sort((a, b) => a.name.localeCompare(b.name))
    .map(m => {
      const versions = [...m.versions].sort((a, b) => b.version - a.version);
      return {
        name: m.name,
        label: m.name,
        detail: [m.model_type, `${versions.length} version${versions.length === 1 ? '' : 's'}`].filter(Boolean).join(' · '),
        versions: versions.map(v => ({
          label: `v${v.version}`,
          metrics: formatMetrics(v.metrics),
          metricsOn: metricsOn(v),
          aliases: (v.aliases ?? []).join(', '),
          devices: (v.devices ?? []).join(', '),
          runUrl: v.mlflow_run_url || null
        }))
      };
    });
}

export interface IDeviceRow {
  name: string;
  status: 'online' | 'offline';
  active: string;
  providers: string;
  p95: string;
  errors: string;
  title: string;
}

/** One row per device: status, "species@2" (every model it runs, or "nothing deployed"), providers really used
 * (by the busiest model), p95, error rate. */
export function deviceRows(devices: IDevice[]): IDeviceRow[] {
  return [...devices]
    .sort((a, b) => a.name.localeCompare(b.name))
    .map(d => ({
      name: d.name,
      status: d.online ? 'online' : 'offline',
      active: activeModels(d) || 'nothing deployed',
      providers: (d.providers ?? []).join(', ') || '—',
      p95: formatMs(d.p95_ms),
      errors: formatRate(d.error_rate),
      title: [d.url, d.error].filter(Boolean).join(' — ')
    }));
}

export interface IJobRow {
  name: string;
  schedule: string;
  next: string;
  last: string;
  /** the path JupyterLab can open, or null */
  notebook: string | null;
  /** the output notebook's full path (shown when it cannot be opened) */
  notebookFile: string | null;
}

export function jobRows(jobs: IJob[], now: Date = new Date()): IJobRow[] {
  return [...jobs]
    .sort((a, b) => a.name.localeCompare(b.name))
    .map(j => ({
      name: j.name,
      schedule: `${j.schedule || 'manual'}${j.paused ? ' (paused)' : ''}`,
      next: j.next_run ? relativeTime(j.next_run, now) : '—',
      last: j.last_status ? `${j.last_status}${j.last_run_at ? ` ${relativeTime(j.last_run_at, now)}` : ''}` : 'never run',
      notebook: j.last_output_notebook_path || null,
      notebookFile: j.last_output_notebook || null
    }));
}

export interface IAlertRow {
  name: string;
  /** 'every 5m · next in 3 min' */
  when: string;
  /** 'fired 2 min ago (4 times)' or 'never fired' */
  fired: string;
  /** the last check: 'ok 1 min ago', 'never checked' */
  last: string;
  /** the newest error (a failed query or notification), first line; '' when none */
  error: string;
  /** whether the alert is firing now (its last check fired) or failing: the row is marked */
  state: 'fired' | 'failed' | 'ok';
  /** the notify URLs, for the row's tooltip */
  title: string;
}

export function alertRows(alerts: IAlert[], now: Date = new Date()): IAlertRow[] {
  return [...alerts]
    .sort((a, b) => a.name.localeCompare(b.name))
    .map(a => {
      const n = a.fired_count ?? 0;
      const status = a.last_status ?? null;
      return {
        name: a.name,
        when: `every ${a.every || '?'}${a.next_check ? ` · next ${relativeTime(a.next_check, now)}` : ''}`,
        fired: a.last_fired ? `fired ${relativeTime(a.last_fired, now)} (${n} time${n === 1 ? '' : 's'})` : 'never fired',
        last: status ? `${status}${a.last_checked ? ` ${relativeTime(a.last_checked, now)}` : ''}` : 'never checked',
        error: (a.last_error ?? '').split('\n')[0],
        state: status === 'query_failed' ? 'failed' : status === 'fired' || status === 'cooldown' ? 'fired' : 'ok',
        title: (a.notify ?? []).join('\n')
      };
    });
}

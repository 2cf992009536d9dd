import { activeModels, alertRows, deviceRows, formatMetrics, formatNumber, jobRows, metricsOn, modelRows, relativeTime } from '../src/logic/format';

describe('panel rows', () => {
  it('formats numbers as people read them', () => {
    expect(formatNumber(0.912345)).toBe('0.912');
    expect(formatNumber(1632661.0)).toBe('1,632,661');
    expect(formatNumber(42)).toBe('42');
    expect(formatNumber(null)).toBe('—');
    expect(formatMetrics({ roc_auc: 0.98765, log_loss: 0.1234, accuracy: 0.9, f1: 0.5 })).toBe(
      'roc_auc 0.988 · log_loss 0.123 · accuracy 0.9'
    );
  });

  it('lists models by name with versions newest first and the MLflow link', () => {
    const rows = modelRows([
      { name: 'zeta', versions: [] },
      {
        name: 'species',
        model_type: 'boosted_tree_classifier',
        versions: [
          { version: 1, metrics: { accuracy: 0.97 }, aliases: [], devices: [] },
          { version: 2, metrics: { accuracy: 0.985 }, aliases: ['champion'], devices: ['local'], mlflow_run_url: 'http://m/runs/abc' }
        ]
      }
    ]);
    expect(rows.map(r => r.name)).toEqual(['species', 'zeta']);
    expect(rows[0].detail).toBe('boosted_tree_classifier · 2 versions');
    expect(rows[0].versions[0]).toEqual({ label: 'v2', metrics: 'accuracy 0.985', metricsOn: '', aliases: 'champion', devices: 'local', runUrl: 'http://m/runs/abc' });
    expect(rows[0].versions[1].runUrl).toBeNull();
  });

  it('says which rows a version was evaluated on', () => {
    expect(metricsOn({ metrics_on: { rows: 69, held_out: true } })).toBe('on 69 held-out rows');
    expect(metricsOn({ metrics_on: { rows: 344, held_out: false } })).toBe('on 344 training rows, no held-out split');
    expect(metricsOn({})).toBe('');
    const [m] = modelRows([{ name: 'm', versions: [{ version: 1, metrics: { roc_auc: 0.783 }, metrics_on: { rows: 69, held_out: true } }] }]);
    expect(m.versions[0].metricsOn).toBe('on 69 held-out rows');
  });

  it('lists devices with status, active version, providers, p95 and error rate', () => {
    const [a, b] = deviceRows([
      { name: 'pi', online: false, error: 'connection refused', url: 'http://pi:7070' },
      { name: 'local', online: true, active_model: 'species', active_version: 2, providers: ['cpu'], p95_ms: 1.234, error_rate: 0.0125 }
    ]);
    expect(a).toEqual({ name: 'local', status: 'online', active: 'species@2', providers: 'cpu', p95: '1.23 ms', errors: '1.25 %', title: '' });
    expect(b.status).toBe('offline');
    expect(b.active).toBe('nothing deployed');
    expect(b.title).toBe('http://pi:7070 — connection refused');
  });

  it('names every model a device runs, the busiest first', () => {
    expect(activeModels({ name: 'd', online: true, active_model: 'b', active_version: 2, models: [{ model: 'a', version: 1 }, { model: 'b', version: 2 }] })).toBe('b@2, a@1');
    expect(activeModels({ name: 'd', online: true, active_model: 'b', active_version: 2 })).toBe('b@2');
    expect(activeModels({ name: 'd', online: true, models: [] })).toBe('');
  });

  it('says when jobs run next and how they last ended', () => {
    const now = new Date('2026-12-01T12:00:00Z');
    expect(relativeTime('2026-12-01T12:05:00Z', now)).toBe('in 5 min');
    expect(relativeTime('2026-12-01T11:59:30Z', now)).toBe('30 s ago');
    const [j] = jobRows([{ name: 'nightly', schedule: '0 3 * * *', next_run: '2026-12-01T15:00:00Z', last_status: 'ok',
      last_run_at: '2026-12-01T11:00:00Z', last_output_notebook: '/srv/root/jobs/nightly/out.ipynb',
      last_output_notebook_path: 'jobs/nightly/out.ipynb' }], now);
    expect(j).toEqual({ name: 'nightly', schedule: '0 3 * * *', next: 'in 3 h', last: 'ok 1 h ago',
      notebook: 'jobs/nightly/out.ipynb', notebookFile: '/srv/root/jobs/nightly/out.ipynb' });
    const [x] = jobRows([{ name: 'x', paused: true, last_output_notebook: '/elsewhere/out.ipynb', last_output_notebook_path: null }], now);
    expect(x).toMatchObject({ schedule: 'manual (paused)', last: 'never run', notebook: null, notebookFile: '/elsewhere/out.ipynb' });
  });

  it('lists alerts with their interval, last fired time and last error, marking the firing and the failing', () => {
    const now = new Date('2026-12-01T12:00:00Z');
    const rows = alertRows([
      { name: 'skew', every: '1h', notify: ['mailto://bob:****@example.com'], last_status: 'query_failed',
        last_checked: '2026-12-01T11:58:00Z', fired_count: 0, last_error: 'Catalog Error: Table scores does not exist\n  SELECT' },
      { name: 'low_acc', every: '5m', notify: ['json://127.0.0.1:8123/hook', 'slack://T...2/A...D/T...Q'],
        next_check: '2026-12-01T12:03:00Z', last_status: 'fired', last_checked: '2026-12-01T11:58:00Z',
        last_fired: '2026-12-01T11:58:00Z', fired_count: 4, last_error: null },
      { name: 'quiet', every: '1 day' }
    ], now);
    expect(rows.map(r => r.name)).toEqual(['low_acc', 'quiet', 'skew']);
    expect(rows[0]).toEqual({ name: 'low_acc', when: 'every 5m · next in 3 min', fired: 'fired 2 min ago (4 times)',
      last: 'fired 2 min ago', error: '', state: 'fired', title: 'json://127.0.0.1:8123/hook\nslack://T...2/A...D/T...Q' });
    expect(rows[1]).toMatchObject({ when: 'every 1 day', fired: 'never fired', last: 'never checked', state: 'ok', title: '' });
    expect(rows[2]).toMatchObject({ fired: 'never fired', error: 'Catalog Error: Table scores does not exist', state: 'failed' });
  });
});

/**
 * Tab with a single match inserts it, in MLSQL cells.
 *
 * JupyterLab 4's completer shows a lone match as a list of one and inserts it only at a second
 * Tab (its widget inserts a single item on a Tab pressed while it is open, and the first Tab only
 * opens it). The kernel's reply is right (`cursor_start`..`cursor_end` is the typed prefix), so
 * here, after a Tab (the command `completer:invoke-notebook`) in an MLSQL cell, a completer that
 * opens on that very cell with exactly one item is accepted at once (`completer:select-notebook`),
 * as a terminal completes a unique prefix. Several matches are listed as before.
 */
import { JupyterFrontEnd } from '@jupyterlab/application';
import { INotebookTracker } from '@jupyterlab/notebook';

import { MLSQL_MIME } from './logic/magic';

const INVOKE = 'completer:invoke-notebook';
const SELECT = 'completer:select-notebook';
/** How long a Tab waits for the kernel's answer (JupyterLab drops it after its provider timeout anyway). */
const WAIT_MS = 10_000;

export function insertSingleCompletion(app: JupyterFrontEnd, tracker: INotebookTracker): void {
  let stopWatching: (() => void) | null = null;

  app.commands.commandExecuted.connect((_, { id }) => {
    if (id !== INVOKE) {
      return;
    }
    stopWatching?.();
    const cell = tracker.activeCell;
    if (!cell || cell.model.type !== 'code' || cell.model.mimeType !== MLSQL_MIME) {
      return;
    }
    const source = cell.model.sharedModel.getSource();
    const unchanged = () => tracker.activeCell === cell && cell.model.sharedModel.getSource() === source;

    const check = (): boolean => {
      if (!unchanged()) {
        return true; // typed on, or moved away: the user's choice now
      }
      const open = Array.from(document.querySelectorAll<HTMLElement>('.jp-Completer')).find(c => !c.classList.contains('lm-mod-hidden'));
      if (!open) {
        return false;
      }
      if (open.querySelectorAll('.jp-Completer-item').length === 1) {
        void app.commands.execute(SELECT);
      }
      return true; // open with several matches: they stay listed
    };

    const observer = new MutationObserver(() => {
      if (check()) {
        stop();
      }
    });
    const timer = window.setTimeout(() => stop(), WAIT_MS);
    const stop = () => {
      observer.disconnect();
      window.clearTimeout(timer);
      if (stopWatching === stop) {
        stopWatching = null;
      }
    };
    stopWatching = stop;
    if (!check()) {
      observer.observe(document.body, { childList: true, subtree: true, attributes: true, attributeFilter: ['class'] });
    } else {
      stop();
    }
  });
}

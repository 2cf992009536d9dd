/**
 * Errors in the editor: the `application/vnd.mlsql.error+json` output a failed MLSQL cell
 * publishes renders as one quiet line ("line 3, column 8") that moves the cursor there, and its
 * span is marked in the cell's editor (class mlsql-error-span) until the cell is edited or run.
 */
import { Cell, CodeCell } from '@jupyterlab/cells';
import { CodeMirrorEditor } from '@jupyterlab/codemirror';
import { INotebookTracker } from '@jupyterlab/notebook';
import { IRenderMime } from '@jupyterlab/rendermime-interfaces';
import { StateEffect, StateField } from '@codemirror/state';
import { Decoration, DecorationSet, EditorView } from '@codemirror/view';
import { Widget } from '@lumino/widgets';

import { ERROR_MIME, errorSpan, IErrorPosition, ISpan, positionLabel } from './logic/errorspan';

export const setErrorSpan = StateEffect.define<ISpan | null>();

const errorMark = Decoration.mark({ class: 'mlsql-error-span' });

/** The marked span of an editor: set by setErrorSpan, gone at the first edit. */
export const errorSpanField = StateField.define<DecorationSet>({
  create: () => Decoration.none,
  update(marks, tr) {
    for (const e of tr.effects) {
      if (e.is(setErrorSpan)) {
        return e.value && e.value.to > e.value.from ? Decoration.set([errorMark.range(e.value.from, e.value.to)]) : Decoration.none;
      }
    }
    return tr.docChanged ? Decoration.none : marks;
  },
  provide: f => EditorView.decorations.from(f)
});

function viewOf(cell: Cell): EditorView | null {
  const editor = cell.editor as CodeMirrorEditor | null;
  return editor && (editor as any).editor ? (editor.editor as EditorView) : null;
}

/** Mark `pos` in the cell's editor; returns the span marked. */
export function markError(cell: Cell, pos: IErrorPosition): ISpan | null {
  const view = viewOf(cell);
  if (!view) {
    return null;
  }
  const span = errorSpan(view.state.doc.toString(), pos);
  if (!view.state.field(errorSpanField, false)) {
    view.dispatch({ effects: StateEffect.appendConfig.of(errorSpanField) });
  }
  view.dispatch({ effects: setErrorSpan.of(span) });
  return span;
}

export function clearError(cell: Cell): void {
  const view = viewOf(cell);
  if (view && view.state.field(errorSpanField, false)) {
    view.dispatch({ effects: setErrorSpan.of(null) });
  }
}

/** The notebook cell whose output holds `node`, in any open notebook. */
function cellOf(tracker: INotebookTracker, node: HTMLElement): Cell | null {
  let found: Cell | null = null;
  tracker.forEach(panel => {
    if (!found && panel.node.contains(node)) {
      found = panel.content.widgets.find(c => c instanceof CodeCell && c.node.contains(node)) ?? null;
    }
  });
  return found;
}

export class ErrorPositionRenderer extends Widget implements IRenderMime.IRenderer {
  constructor(private tracker: INotebookTracker) {
    super();
    this.addClass('mlsql-error-position');
  }

  async renderModel(model: IRenderMime.IMimeModel): Promise<void> {
    const pos = (model.data[ERROR_MIME] || {}) as IErrorPosition;
    this.node.textContent = '';
    const label = positionLabel(pos);
    if (!label) {
      return;
    }
    const link = document.createElement('a');
    link.textContent = label;
    link.title = 'Show in the cell';
    link.href = '#';
    link.onclick = (ev: MouseEvent) => {
      ev.preventDefault();
      this.reveal(pos, true);
    };
    this.node.appendChild(link);
    // mark once the output is attached (the cell is known through the DOM)
    requestAnimationFrame(() => this.reveal(pos, false));
  }

  private reveal(pos: IErrorPosition, focus: boolean): void {
    const cell = cellOf(this.tracker, this.node);
    if (!cell) {
      return;
    }
    const span = markError(cell, pos);
    const view = viewOf(cell);
    if (focus && span && view) {
      view.dispatch({ selection: { anchor: span.from, head: span.to }, scrollIntoView: true });
      view.focus();
    }
  }
}

export function errorRendererFactory(tracker: INotebookTracker): IRenderMime.IRendererFactory {
  return {
    safe: true,
    mimeTypes: [ERROR_MIME],
    defaultRank: 10,
    createRenderer: () => new ErrorPositionRenderer(tracker)
  };
}

/**
 * Which language each code cell gets: MLSQL for a `%%mlsql` cell (back to the notebook's language
 * when its first line no longer starts the magic) and for every cell of an MLSQL-kernel notebook.
 * JupyterLab resets the mimetypes of all cells when the kernel's language_info arrives, so each
 * cell model's mimeTypeChanged is watched and the MLSQL choice put back.
 */
import { Cell, ICellModel } from '@jupyterlab/cells';
import { language as languageFacet } from '@codemirror/language';
import { mlsqlDialect } from './language';
import { IEditorLanguageRegistry } from '@jupyterlab/codemirror';
import { NotebookPanel } from '@jupyterlab/notebook';

import { cellMimeType, isMlsqlKernel, MLSQL_MIME } from './logic/magic';

export function watchNotebook(panel: NotebookPanel, languages: IEditorLanguageRegistry): void {
  const notebook = panel.content;
  const watched = new WeakSet<ICellModel>();

  const mlsqlKernel = (): boolean => {
    const kernel = panel.sessionContext.session?.kernel;
    const spec = panel.model?.getMetadata('kernelspec') as { name?: string } | undefined;
    const info = panel.model?.getMetadata('language_info') as { name?: string; mimetype?: string } | undefined;
    return isMlsqlKernel(kernel?.name ?? spec?.name, info);
  };

  const apply = (model: ICellModel): void => {
    if (model.type !== 'code') {
      return;
    }
    const desired = cellMimeType(model.sharedModel.getSource(), notebook.codeMimetype, mlsqlKernel());
    if (model.mimeType !== desired) {
      model.mimeType = desired;
    }
  };

  const watch = (model: ICellModel): void => {
    if (watched.has(model) || model.type !== 'code') {
      return;
    }
    watched.add(model);
    let first = firstLineOf(model);
    // Put MLSQL back only once the editor has loaded the language it was just given: the editor
    // applies each mimetype change when that language has loaded, in order of loading, so a
    // slower first load of (say) SQL would otherwise land after MLSQL and win.
    model.mimeTypeChanged.connect(() => {
      void languages
        .getLanguage(model.mimeType)
        .catch(() => null)
        .then(() => setTimeout(() => apply(model), 0));
      // ... which is not always enough (the editor's own load of the language it was given can
      // still land last): check the editor a little later and make it load MLSQL again.
      for (const ms of [300, 1500]) {
        setTimeout(() => ensureEditorLanguage(notebook.widgets.find(c => c.model === model), model), ms);
      }
    });
    model.sharedModel.changed.connect((_, change) => {
      if (change.sourceChange) {
        const now = firstLineOf(model);
        if (now !== first) {
          first = now;
          apply(model);
        }
      }
    });
    apply(model);
  };

  const all = (): void => {
    const cells = panel.model?.cells;
    if (!cells) {
      return;
    }
    for (let i = 0; i < cells.length; i++) {
      watch(cells.get(i));
      apply(cells.get(i));
    }
  };

  const connectModel = (): void => {
    const model = panel.model;
    if (!model) {
      return;
    }
    model.cells.changed.connect((_, change) => {
      if (change.type === 'add' || change.type === 'set') {
        change.newValues.forEach(watch);
      }
    });
    model.metadataChanged.connect(() => requestAnimationFrame(all));
    all();
  };

  panel.context.ready.then(connectModel);
  panel.sessionContext.kernelChanged.connect(() => requestAnimationFrame(all));
  panel.sessionContext.ready.then(() => requestAnimationFrame(all));
}

/** Make the cell's editor show MLSQL when its model says MLSQL (see the race above). */
function ensureEditorLanguage(cell: Cell | undefined, model: ICellModel): void {
  const editor = cell?.editor as any;
  const view = editor?.editor;
  if (model.mimeType !== MLSQL_MIME || !view || view.state.facet(languageFacet) === mlsqlDialect.language) {
    return;
  }
  if (typeof editor._onMimeTypeChanged === 'function') {
    editor._onMimeTypeChanged(); // loads the model's (current) mimetype into the editor
  }
}

function firstLineOf(model: ICellModel): string {
  const s = model.sharedModel.getSource();
  const nl = s.indexOf('\n');
  return nl < 0 ? s : s.slice(0, nl);
}

/**
 * MLSQL in JupyterLab 4: the MLSQL language (CodeMirror 6) for `%%mlsql` cells and MLSQL-kernel
 * notebooks, error positions marked in the cell, the Deploy command/dialog/toolbar button, and
 * the MLSQL side panel. Completion and Shift-Tab come from the kernels (complete/inspect requests);
 * in MLSQL cells a single match is inserted at the first Tab (completion.ts).
 */
import { ILayoutRestorer, JupyterFrontEnd, JupyterFrontEndPlugin } from '@jupyterlab/application';
import { ICommandPalette, ToolbarButton } from '@jupyterlab/apputils';
import { IEditorLanguageRegistry } from '@jupyterlab/codemirror';
import { INotebookTracker, NotebookActions, NotebookPanel } from '@jupyterlab/notebook';
import { IRenderMimeRegistry } from '@jupyterlab/rendermime';
import { LabIcon } from '@jupyterlab/ui-components';

import { watchNotebook } from './cells';
import { insertSingleCompletion } from './completion';
import { DeployLog, openDeployDialog } from './deployDialog';
import { clearError, errorRendererFactory } from './errors';
import { mlsql } from './language';
import { MLSQL_MIME, modelCreatedBy } from './logic/magic';
import { MlsqlPanel } from './panel';

const ICON_SVG = `<svg xmlns="http://www.w3.org/2000/svg" width="16" height="16" viewBox="0 0 24 24">
<g class="jp-icon3" fill="#616161"><ellipse cx="10" cy="5" rx="7" ry="2.6"/>
<path d="M3 7.2v4.3c0 1.4 3.1 2.6 7 2.6.9 0 1.7-.1 2.5-.2a5.5 5.5 0 0 1 4.5-3.4V7.2c-1.3 1.1-4.1 1.8-7 1.8s-5.7-.7-7-1.8z"/>
<path d="M3 13.7V18c0 1.4 3.1 2.6 7 2.6.7 0 1.4 0 2-.1a5.5 5.5 0 0 1-.4-4.6c-.5.1-1 .1-1.6.1-2.9 0-5.7-.7-7-1.8z"/>
<path d="M17.5 12.5l1 2.2 2.4.3-1.8 1.6.5 2.4-2.1-1.2-2.1 1.2.5-2.4-1.8-1.6 2.4-.3z"/></g></svg>`;

export const mlsqlIcon = new LabIcon({ name: 'mlsql:icon', svgstr: ICON_SVG });

const DEPLOY = 'mlsql:deploy';
const PANEL = 'mlsql:open-panel';

const plugin: JupyterFrontEndPlugin<void> = {
  id: 'mlsql-jupyterlab:plugin',
  description: 'MLSQL: highlighting, error positions, one-click deploy and the MLSQL panel',
  autoStart: true,
  requires: [IEditorLanguageRegistry, INotebookTracker, IRenderMimeRegistry],
  optional: [ICommandPalette, ILayoutRestorer],
  activate: (
    app: JupyterFrontEnd,
    languages: IEditorLanguageRegistry,
    tracker: INotebookTracker,
    rendermime: IRenderMimeRegistry,
    palette: ICommandPalette | null,
    restorer: ILayoutRestorer | null
  ) => {
    languages.addLanguage({
      name: 'MLSQL',
      displayName: 'MLSQL',
      alias: ['mlsql'],
      mime: MLSQL_MIME,
      extensions: ['mlsql'],
      support: mlsql()
    });

    rendermime.addFactory(errorRendererFactory(tracker), 10);

    const log = new DeployLog();
    const panel = new MlsqlPanel(log, {
      deploy: () => void app.commands.execute(DEPLOY),
      openNotebook: path => void app.commands.execute('docmanager:open', { path })
    });
    panel.title.icon = mlsqlIcon;
    app.shell.add(panel, 'left', { rank: 650 });
    restorer?.add(panel, 'mlsql-panel');

    /** The model created by the cell under the context menu (fromCell), else by the active cell. */
    const cellModelName = (fromCell: boolean): string | null => {
      let cell = tracker.activeCell;
      if (fromCell) {
        const hit = app.contextMenuHitTest(node => node.classList.contains('jp-CodeCell'));
        cell = (hit && tracker.currentWidget?.content.widgets.find(c => c.node === hit)) || null;
      }
      return cell && cell.model.type === 'code' ? modelCreatedBy(cell.model.sharedModel.getSource()) : null;
    };

    app.commands.addCommand(DEPLOY, {
      label: args => (args.fromCell ? `Deploy ${cellModelName(true) ?? 'model'}…` : 'Deploy a model…'),
      caption: 'Deploy a registered model to a device or a group (MLSQL)',
      isVisible: args => !args.fromCell || cellModelName(true) !== null,
      execute: args => openDeployDialog(log, cellModelName(!!args.fromCell))
    });
    app.commands.addCommand(PANEL, {
      label: 'Show the MLSQL panel',
      execute: () => app.shell.activateById(panel.id)
    });
    palette?.addItem({ command: DEPLOY, category: 'MLSQL' });
    palette?.addItem({ command: PANEL, category: 'MLSQL' });
    app.contextMenu.addItem({ command: DEPLOY, args: { fromCell: true }, selector: '.jp-Notebook .jp-CodeCell', rank: 20 });

    tracker.widgetAdded.connect((_, nb: NotebookPanel) => {
      nb.toolbar.insertAfter(
        'cellType',
        'mlsql-deploy',
        new ToolbarButton({
          icon: mlsqlIcon,
          label: 'Deploy',
          tooltip: 'Deploy a model (MLSQL)',
          className: 'mlsql-deploy-toolbar',
          onClick: () => void app.commands.execute(DEPLOY)
        })
      );
      watchNotebook(nb, languages);
    });

    // Tab in an MLSQL cell: a single match goes in at once
    insertSingleCompletion(app, tracker);

    // a marked error span goes when its cell runs again
    NotebookActions.executionScheduled.connect((_, { cell }) => clearError(cell));
  }
};

export default plugin;

/** Calls to the mlsql.notebook.server REST handlers, through Jupyter's authenticated connection (token, XSRF). */
import { URLExt } from '@jupyterlab/coreutils';
import { ServerConnection } from '@jupyterlab/services';

import { IDeployBody, IDeployStatus } from './logic/deploy';
import { IAlert, IDevice, IGroup, IJob, IModel } from './logic/format';

export async function requestAPI<T>(endPoint: string, init: RequestInit = {}): Promise<T> {
  const settings = ServerConnection.makeSettings();
  const url = URLExt.join(settings.baseUrl, 'mlsql', 'api', endPoint);
  let response: Response;
  try {
    response = await ServerConnection.makeRequest(url, init, settings);
  } catch (error) {
    throw new ServerConnection.NetworkError(error as TypeError);
  }
  const text = await response.text();
  let data: any = text;
  if (text.length > 0) {
    try {
      data = JSON.parse(text);
    } catch {
      // not JSON: keep the text for the error message
    }
  }
  if (!response.ok) {
    let message: string;
    if (data && typeof data === 'object' && (data.message || data.error || data.reason)) {
      message = String(data.message || data.error || data.reason);
    } else if (response.status === 404) {
      message =
        'this Jupyter server does not run the mlsql.notebook.server extension: enable it with ' +
        '`jupyter server extension enable mlsql.notebook.server` and restart (`make lab` runs it)';
    } else {
      message = `${response.status} ${response.statusText}`; // an HTML error page says nothing more
    }
    throw new ServerConnection.ResponseError(response, message);
  }
  return data as T;
}

export const api = {
  models: () => requestAPI<{ models: IModel[] }>('models'),
  devices: () => requestAPI<{ devices: IDevice[]; groups: IGroup[] }>('devices'),
  jobs: () => requestAPI<{ jobs: IJob[] }>('jobs'),
  alerts: () => requestAPI<{ alerts: IAlert[] }>('alerts'),
  info: () => requestAPI<{ version: string; workspace: string; mlflow_ui: string | null }>('info'),
  deploy: (body: IDeployBody) => requestAPI<{ id: string }>('deploys', { method: 'POST', body: JSON.stringify(body) }),
  deployStatus: (id: string) => requestAPI<IDeployStatus>(`deploys/${encodeURIComponent(id)}`)
};

// The audit log: the newest entries.

import { getJson } from './api.js';
import { $, el } from './dom.js';
import { state } from './state.js';

export function renderAudit() {
  $('audit')
    .querySelector('tbody')
    .replaceChildren(
      ...state.audit.map((a) =>
        el('tr', {}, el('td', {}, new Date(a.ts).toLocaleString()), el('td', {}, a.actor), el('td', {}, a.token), el('td', {}, a.action), el('td', {}, a.target)),
      ),
    );
}

export async function refreshAudit() {
  state.audit = (await getJson('/v1/audit?limit=15')).entries;
  renderAudit();
}

/**
 * A small, strict XML 1.0 reader for the unattend files the carry-over reads and writes:
 * elements, attributes, text, CDATA, comments, processing instructions and the five
 * predefined and numeric character references. No DTDs (refused, so no entity expansion).
 * Namespaces are resolved: every element and prefixed attribute carries its namespace URI.
 * Anything not well-formed throws SC_ERR_BAD_CONFIG.
 */
import { scError } from '../../../shared/errors.js';

/** A parsed element. `ns` is the namespace URI ('' for none); attribute keys are `{uri}local` or `local`. */
export interface XmlElement {
  name: string;
  local: string;
  ns: string;
  attrs: Record<string, string>;
  children: XmlElement[];
  text: string;
}

const NAME = /^[A-Za-z_][A-Za-z0-9._-]*(?::[A-Za-z_][A-Za-z0-9._-]*)?/;
const XML_NS = 'http://www.w3.org/XML/1998/namespace';

/** Escapes text for element content and attribute values. */
export function xmlEscape(s: string): string {
  return s.replace(/&/g, '&amp;').replace(/</g, '&lt;').replace(/>/g, '&gt;').replace(/"/g, '&quot;').replace(/'/g, '&apos;');
}

function decodeRefs(s: string, at: number): string {
  if (s.includes('<')) throw bad(at, "'<' in attribute value");
  return s.replace(/&([^;]{0,12});|&/g, (m, ref: string | undefined) => {
    if (ref === undefined) throw bad(at, 'bare &');
    switch (ref) {
      case 'lt':
        return '<';
      case 'gt':
        return '>';
      case 'amp':
        return '&';
      case 'quot':
        return '"';
      case 'apos':
        return "'";
    }
    const num = /^#x([0-9A-Fa-f]{1,6})$/.exec(ref) ?? /^#([0-9]{1,7})$/.exec(ref);
    if (num) {
      const cp = Number.parseInt(num[1], ref[1] === 'x' ? 16 : 10);
      if (cp === 0 || cp > 0x10ffff || (cp >= 0xd800 && cp <= 0xdfff)) throw bad(at, `bad character reference ${m}`);
      return String.fromCodePoint(cp);
    }
    throw bad(at, `unknown entity ${m}`);
  });
}

function bad(at: number, msg: string) {
  return scError('SC_ERR_BAD_CONFIG', `malformed XML at offset ${at}: ${msg}`);
}

interface Raw {
  name: string;
  attrs: [string, string][];
  children: Raw[];
  text: string;
}

/** Parses a whole document and returns its root element with namespaces resolved. */
export function parseXml(src: string): XmlElement {
  let i = 0;
  if (src.charCodeAt(0) === 0xfeff) i = 1;
  const stack: Raw[] = [];
  let root: Raw | null = null;

  const misc = () => {
    // comments, PIs and whitespace outside the root element
    for (;;) {
      while (i < src.length && /\s/.test(src[i])) i++;
      if (src.startsWith('<!--', i)) skipComment();
      else if (src.startsWith('<?', i)) skipPi();
      else return;
    }
  };
  const skipComment = () => {
    const end = src.indexOf('-->', i + 4);
    if (end < 0) throw bad(i, 'unterminated comment');
    if (src.slice(i + 4, end).includes('--')) throw bad(i, "'--' inside comment");
    i = end + 3;
  };
  const skipPi = () => {
    const end = src.indexOf('?>', i + 2);
    if (end < 0) throw bad(i, 'unterminated processing instruction');
    const target = /^[A-Za-z_][\w.-]*/.exec(src.slice(i + 2))?.[0];
    if (!target) throw bad(i, 'processing instruction without a target');
    if (target.toLowerCase() === 'xml' && i !== 0 && !(i === 1 && src.charCodeAt(0) === 0xfeff)) throw bad(i, 'XML declaration not at the start');
    i = end + 2;
  };

  if (src.startsWith('<?xml', i)) skipPi();
  misc();
  if (src.startsWith('<!DOCTYPE', i)) throw bad(i, 'DTDs are not accepted');

  for (;;) {
    if (i >= src.length) break;
    if (src[i] !== '<') {
      const next = src.indexOf('<', i);
      const end = next < 0 ? src.length : next;
      const text = src.slice(i, end);
      if (stack.length === 0) {
        if (text.trim()) throw bad(i, 'text outside the root element');
      } else {
        if (text.includes(']]>')) throw bad(i, "']]>' in text");
        stack[stack.length - 1].text += decodeRefs(text, i);
      }
      i = end;
      continue;
    }
    if (src.startsWith('<!--', i)) {
      skipComment();
      continue;
    }
    if (src.startsWith('<?', i)) {
      skipPi();
      continue;
    }
    if (src.startsWith('<![CDATA[', i)) {
      if (stack.length === 0) throw bad(i, 'CDATA outside the root element');
      const end = src.indexOf(']]>', i);
      if (end < 0) throw bad(i, 'unterminated CDATA');
      stack[stack.length - 1].text += src.slice(i + 9, end);
      i = end + 3;
      continue;
    }
    if (src.startsWith('<!', i)) throw bad(i, 'declarations are not accepted');
    if (src[i + 1] === '/') {
      const m = NAME.exec(src.slice(i + 2));
      if (!m) throw bad(i, 'bad end tag');
      const open = stack.pop();
      if (!open || open.name !== m[0]) throw bad(i, `end tag </${m[0]}> does not match <${open?.name ?? ''}>`);
      i += 2 + m[0].length;
      while (/\s/.test(src[i] ?? '')) i++;
      if (src[i] !== '>') throw bad(i, 'bad end tag');
      i++;
      if (stack.length === 0) {
        misc();
        if (i < src.length) throw bad(i, 'content after the root element');
        break;
      }
      continue;
    }
    // start tag
    if (stack.length === 0 && root) throw bad(i, 'second root element');
    const m = NAME.exec(src.slice(i + 1));
    if (!m) throw bad(i, 'bad start tag');
    const el: Raw = { name: m[0], attrs: [], children: [], text: '' };
    i += 1 + m[0].length;
    for (;;) {
      const ws = /^\s*/.exec(src.slice(i))![0].length;
      i += ws;
      if (src.startsWith('/>', i) || src[i] === '>') break;
      if (!ws) throw bad(i, 'attributes must be separated by whitespace');
      const an = NAME.exec(src.slice(i));
      if (!an) throw bad(i, 'bad attribute name');
      i += an[0].length;
      while (/\s/.test(src[i] ?? '')) i++;
      if (src[i] !== '=') throw bad(i, 'attribute without a value');
      i++;
      while (/\s/.test(src[i] ?? '')) i++;
      const q = src[i];
      if (q !== '"' && q !== "'") throw bad(i, 'unquoted attribute value');
      const end = src.indexOf(q, i + 1);
      if (end < 0) throw bad(i, 'unterminated attribute value');
      if (el.attrs.some(([k]) => k === an[0])) throw bad(i, `duplicate attribute ${an[0]}`);
      el.attrs.push([an[0], decodeRefs(src.slice(i + 1, end), i).replace(/[\t\n\r]/g, ' ')]);
      i = end + 1;
    }
    if (i >= src.length) throw bad(i, 'unterminated start tag');
    const selfClosing = src[i] === '/';
    i += selfClosing ? 2 : 1;
    if (stack.length) stack[stack.length - 1].children.push(el);
    else root = el;
    if (!selfClosing) stack.push(el);
    else if (stack.length === 0) {
      misc();
      if (i < src.length) throw bad(i, 'content after the root element');
      break;
    }
  }
  if (stack.length) throw bad(i, `unclosed element <${stack[stack.length - 1].name}>`);
  if (!root) throw bad(0, 'no root element');
  return resolve(root, { xml: XML_NS });
}

function resolve(el: Raw, scope: Record<string, string>): XmlElement {
  const s = { ...scope };
  for (const [k, v] of el.attrs) {
    if (k === 'xmlns') s[''] = v;
    else if (k.startsWith('xmlns:')) {
      if (!v) throw bad(0, `empty namespace for prefix ${k.slice(6)}`);
      s[k.slice(6)] = v;
    }
  }
  const split = (q: string, isAttr: boolean): [string, string] => {
    const c = q.indexOf(':');
    if (c < 0) return [isAttr ? '' : (s[''] ?? ''), q];
    const prefix = q.slice(0, c);
    const uri = s[prefix];
    if (uri === undefined) throw bad(0, `undeclared namespace prefix ${prefix}`);
    return [uri, q.slice(c + 1)];
  };
  const [ns, local] = split(el.name, false);
  const attrs: Record<string, string> = {};
  for (const [k, v] of el.attrs) {
    if (k === 'xmlns' || k.startsWith('xmlns:')) continue;
    const [u, l] = split(k, true);
    const key = u ? `{${u}}${l}` : l;
    if (key in attrs) throw bad(0, `duplicate attribute ${key}`);
    attrs[key] = v;
  }
  return { name: el.name, local, ns, attrs, text: el.text, children: el.children.map((c) => resolve(c, s)) };
}

/** Direct children of `el` with namespace `ns` and local name `local`. */
export function childrenNamed(el: XmlElement, ns: string, local: string): XmlElement[] {
  return el.children.filter((c) => c.ns === ns && c.local === local);
}

/** The first direct child with this name, or undefined. */
export function childNamed(el: XmlElement, ns: string, local: string): XmlElement | undefined {
  return el.children.find((c) => c.ns === ns && c.local === local);
}

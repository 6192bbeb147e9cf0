/**
 * A strict XML 1.0 reader for the unattend files the carry-over reads and writes, on
 * fast-xml-parser: its validator checks well-formedness (tags, attributes, quoting, stray `&`),
 * its parser gives the tree in document order. Elements, attributes, text, CDATA, comments,
 * processing instructions and the five predefined and numeric character references are read.
 * No DTDs (refused, so no entity expansion): entity processing is off in the parser, and its
 * entity decoder hook, which it calls for every DOCTYPE it meets, refuses the document.
 * Namespaces are resolved: every element and prefixed attribute carries its namespace URI.
 * Line ends are normalised to \n, as XML 1.0 requires. Elements nest at most 100 deep (the
 * library's limit; an unattend file needs fewer than ten). Anything not well-formed throws
 * SC_ERR_BAD_CONFIG.
 *
 * Kept by hand, because the library does not do it:
 * - namespace resolution (it can only strip prefixes);
 * - character references: with entity processing off it leaves `&…;` as written, and with it on
 *   it would also expand entities a DTD declares and reads numeric references only in its HTML
 *   mode. So `decodeRefs` decodes the five predefined and numeric references and refuses a bare
 *   `&`, any other entity and code points XML does not allow;
 * - checks its validator does not make: exactly one root element, no `--` inside a comment, no
 *   `<` in an attribute value, no `]]>` in text, the XML declaration only at the very start, no
 *   markup declaration (`<!ELEMENT …>`, `<!ENTITY …>`) outside a DOCTYPE, and no text after the
 *   last tag (the parser drops it).
 */
import { type EntityDecoderOptions, XMLParser, XMLValidator } from 'fast-xml-parser';
import { isScError, scError } from '../../../shared/errors.js';

/** A parsed element. `ns` is the namespace URI ('' for none); attribute keys are `{uri}local` or `local`. */
export interface XmlElement {
  name: string;
  local: string;
  ns: string;
  attrs: Record<string, string>;
  children: XmlElement[];
  text: string;
}

const XML_NS = 'http://www.w3.org/XML/1998/namespace';

/** Escapes text for element content and attribute values. */
export function xmlEscape(s: string): string {
  return s.replace(/&/g, '&amp;').replace(/</g, '&lt;').replace(/>/g, '&gt;').replace(/"/g, '&quot;').replace(/'/g, '&apos;');
}

function decodeRefs(s: string): string {
  if (s.includes('<')) throw bad("'<' in attribute value");
  return s.replace(/&([^;]{0,12});|&/g, (m, ref: string | undefined) => {
    if (ref === undefined) throw bad('bare &');
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
      if (cp === 0 || cp > 0x10ffff || (cp >= 0xd800 && cp <= 0xdfff)) throw bad(`bad character reference ${m}`);
      return String.fromCodePoint(cp);
    }
    throw bad(`unknown entity ${m}`);
  });
}

function bad(msg: string) {
  return scError('SC_ERR_BAD_CONFIG', `malformed XML: ${msg}`);
}

interface Raw {
  name: string;
  attrs: [string, string][];
  children: Raw[];
  text: string;
}

// Keys of fast-xml-parser's `preserveOrder` nodes: `{ [tag]: children, ':@': attributes }`,
// `{ '#text': text }`, `{ '#cdata': [{ '#text': raw }] }`, `{ '#comment': [{ '#text': body }] }`;
// processing instructions are tags named `?target`.
const TEXT = '#text';
const CDATA = '#cdata';
const COMMENT = '#comment';
const ATTRS = ':@';

type OrderedNode = Record<string, unknown>;

/** The parser's entity decoder: never asked to decode (entity processing is off); refuses any DOCTYPE. */
const noDtd: EntityDecoderOptions = {
  setExternalEntities: () => {},
  addInputEntities: () => {
    throw bad('DTDs are not accepted');
  },
  reset: () => {},
  decode: (text) => text,
  setXmlVersion: () => {},
};

const parser = new XMLParser({
  preserveOrder: true,
  ignoreAttributes: false,
  attributeNamePrefix: '',
  textNodeName: TEXT,
  cdataPropName: CDATA,
  commentPropName: COMMENT,
  parseTagValue: false,
  parseAttributeValue: false,
  trimValues: false,
  allowBooleanAttributes: false,
  processEntities: false,
  htmlEntities: false,
  entityDecoder: noDtd,
  ignoreDeclaration: false,
  ignorePiTags: false,
  removeNSPrefix: false,
});

/** The node's tag (or `#text`, `#cdata`, `#comment`, `?target`). */
function nodeName(n: OrderedNode): string {
  return Object.keys(n).find((k) => k !== ATTRS) ?? '';
}

/** The text inside a `#cdata` or `#comment` node. */
function innerText(n: OrderedNode, key: string): string {
  return ((n[key] as OrderedNode[])[0]?.[TEXT] as string | undefined) ?? '';
}

/** Checks a comment or processing instruction; `atStart` when it opens the document. */
function checkMisc(n: OrderedNode, name: string, atStart: boolean): void {
  if (name === COMMENT) {
    if (innerText(n, COMMENT).includes('--')) throw bad("'--' inside comment");
  } else if (name.slice(1).toLowerCase() === 'xml' && !atStart) {
    throw bad('XML declaration not at the start');
  }
}

function toRaw(n: OrderedNode, name: string): Raw {
  const attrs = Object.entries((n[ATTRS] as Record<string, string> | undefined) ?? {}).map(([k, v]): [string, string] => [k, decodeRefs(String(v)).replace(/[\t\n\r]/g, ' ')]);
  const el: Raw = { name, attrs, children: [], text: '' };
  for (const c of n[name] as OrderedNode[]) {
    const cn = nodeName(c);
    if (cn === TEXT) {
      const text = String(c[TEXT]);
      if (text.includes(']]>')) throw bad("']]>' in text");
      el.text += decodeRefs(text);
    } else if (cn === CDATA) {
      el.text += innerText(c, CDATA);
    } else if (cn === COMMENT || cn.startsWith('?')) {
      checkMisc(c, cn, false);
    } else {
      // The library reads `<!ELEMENT …>` and the like inside an element as a tag named `!ELEMENT`.
      if (cn.startsWith('!')) throw bad('declarations are not accepted');
      el.children.push(toRaw(c, cn));
    }
  }
  return el;
}

/** Parses a whole document and returns its root element with namespaces resolved. */
export function parseXml(src: string): XmlElement {
  const doc = src.charCodeAt(0) === 0xfeff ? src.slice(1) : src;
  // The library drops text after the last tag; a well-formed document ends with '>'.
  if (!/>\s*$/.test(doc)) throw bad('content after the root element');
  const valid = XMLValidator.validate(doc);
  if (valid !== true) throw scError('SC_ERR_BAD_CONFIG', `malformed XML at line ${valid.err.line}, column ${valid.err.col}: ${valid.err.msg}`);
  let nodes: OrderedNode[];
  try {
    nodes = parser.parse(doc) as OrderedNode[];
  } catch (err) {
    if (isScError(err)) throw err;
    throw bad((err as Error)?.message ?? String(err));
  }
  let root: Raw | null = null;
  for (const [k, n] of nodes.entries()) {
    const name = nodeName(n);
    if (name === TEXT) {
      if (String(n[TEXT]).trim()) throw bad('text outside the root element');
    } else if (name === CDATA) {
      throw bad('CDATA outside the root element');
    } else if (name === COMMENT || name.startsWith('?')) {
      checkMisc(n, name, k === 0);
    } else {
      if (name.startsWith('!')) throw bad('declarations are not accepted');
      if (root) throw bad('second root element');
      root = toRaw(n, name);
    }
  }
  if (!root) throw bad('no root element');
  return resolve(root, { xml: XML_NS });
}

function resolve(el: Raw, scope: Record<string, string>): XmlElement {
  const s = { ...scope };
  for (const [k, v] of el.attrs) {
    if (k === 'xmlns') s[''] = v;
    else if (k.startsWith('xmlns:')) {
      if (!v) throw bad(`empty namespace for prefix ${k.slice(6)}`);
      s[k.slice(6)] = v;
    }
  }
  const split = (q: string, isAttr: boolean): [string, string] => {
    const c = q.indexOf(':');
    if (c < 0) return [isAttr ? '' : (s[''] ?? ''), q];
    const prefix = q.slice(0, c);
    const uri = s[prefix];
    if (uri === undefined) throw bad(`undeclared namespace prefix ${prefix}`);
    return [uri, q.slice(c + 1)];
  };
  const [ns, local] = split(el.name, false);
  const attrs: Record<string, string> = {};
  for (const [k, v] of el.attrs) {
    if (k === 'xmlns' || k.startsWith('xmlns:')) continue;
    const [u, l] = split(k, true);
    const key = u ? `{${u}}${l}` : l;
    if (key in attrs) throw bad(`duplicate attribute ${key}`);
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

// The unattend XML reader refuses every document type declaration, so no entity is ever
// expanded: a billion-laughs document, an external entity and an external DTD are refused before
// anything is resolved, an undeclared entity reference is refused, and entity-like text in
// CDATA stays literal. Also: line ends are normalised, namespaces resolved.
import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { isScError } from '../../shared/errors.js';
import { parseXml } from '../../services/agent/carry/xml.js';

const refused = (src: string, why: RegExp) => {
  assert.throws(
    () => parseXml(src),
    (e) => isScError(e, 'SC_ERR_BAD_CONFIG') && why.test((e as Error).message),
  );
};

const LOLZ = [
  '<?xml version="1.0"?>',
  '<!DOCTYPE lolz [',
  ' <!ENTITY lol "lol">',
  ' <!ENTITY lol1 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">',
  ' <!ENTITY lol2 "&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;">',
  ' <!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">',
  ' <!ENTITY lol4 "&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;">',
  ' <!ENTITY lol5 "&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;">',
  ' <!ENTITY lol6 "&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;">',
  ' <!ENTITY lol7 "&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;">',
  ' <!ENTITY lol8 "&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;">',
  ' <!ENTITY lol9 "&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;">',
  ']>',
  '<lolz>&lol9;</lolz>',
].join('\n');

describe('XML reader: no DTD, no entity expansion', () => {
  it('refuses a billion-laughs document, at once', () => {
    const t0 = performance.now();
    refused(LOLZ, /DTD/);
    assert.ok(performance.now() - t0 < 1000, 'refused without expanding anything');
  });

  it('refuses an internal entity even when it is never used', () => {
    refused('<!DOCTYPE a [<!ENTITY x "y">]><a/>', /DTD/);
    refused('\ufeff<?xml version="1.0"?>\n<!-- c -->\n<!DOCTYPE a [<!ENTITY x "y">]><a>&x;</a>', /DTD/);
  });

  it('refuses an external entity and an external DTD', () => {
    // The library itself refuses an external entity while it reads the DOCTYPE.
    refused('<?xml version="1.0"?><!DOCTYPE a [<!ENTITY xxe SYSTEM "file:///etc/passwd">]><a>&xxe;</a>', /DTD|external entit/i);
    refused('<!DOCTYPE a SYSTEM "http://127.0.0.1:1/evil.dtd"><a/>', /DTD/);
    refused('<!DOCTYPE a PUBLIC "-//x//y" "file:///etc/passwd"><a/>', /DTD/);
    refused('<!DOCTYPE a [<!ENTITY % p SYSTEM "file:///etc/passwd"> %p;]><a/>', /./);
  });

  it('refuses a reference to an entity no one declared, and markup declarations in content', () => {
    refused('<a>&xxe;</a>', /unknown entity/);
    refused('<a x="&lol9;"/>', /unknown entity/);
    refused('<a><!ENTITY x "y"></a>', /declarations/);
    refused('<a><!DOCTYPE a></a>', /./);
  });

  it('keeps entity-like text in CDATA literally', () => {
    assert.equal(parseXml('<a><![CDATA[&lol9;<!DOCTYPE x>]]></a>').text, '&lol9;<!DOCTYPE x>');
  });
});

describe('XML reader: documents', () => {
  it('normalises line ends and resolves namespaces', () => {
    const el = parseXml('<?xml version="1.0"?>\r\n<u xmlns="urn:u" xmlns:w="urn:w">\r\n<c w:k="1">a\r\nb</c></u>\r\n');
    assert.equal(el.ns, 'urn:u');
    assert.equal(el.children[0].local, 'c');
    assert.equal(el.children[0].attrs['{urn:w}k'], '1');
    assert.equal(el.children[0].text, 'a\nb');
  });

  it('refuses a second XML declaration and text or a second element after the root', () => {
    refused('<?xml version="1.0"?><?xml version="1.0"?><a/>', /declaration/);
    refused('<a/><b/>', /second root/);
    refused('<a/>x', /after the root/);
    refused('<a/>x<!-- c -->', /./);
  });
});

//! Differential check of the elements hash and `elements_chain` against the reference's
//! `extractElements` + `hashElements` / `elementsToString` evaluated in Node on tricky inputs
//! (non-ASCII and astral text, quotes, backslashes, control characters, numeric/boolean/object
//! attribute values, class and attribute ordering, empty values), and of `chain_to_elements`
//! against the reference's `chainToElements` on 283 recorded chains.

use plugin_server::ingestion::elements::{chain_to_elements, elements_hash, elements_to_chain, extract_elements};
use serde_json::Value;

const CASES: &str = r#"[
 [{"tag_name":"a","nth_child":1,"nth_of_type":2,"attr__class":"btn btn-sm","$el_text":"Ünïcödé ☃ \"quoted\" \\ back\tslash\n"}],
 [{"tag_name":"button","attr__data-attr":"x\"y","attr__Style":"a;b","attr__aria-label":"Close ✕","attr__id":"Main","attr__href":"/p?q=ä&r=1","nth_child":3,"nth_of_type":1,"$el_text":"𝒳 emoji 👍🏽"}],
 [{"tag_name":"div","attr__class":"z a M _x -y 9k","attr__data-n":7,"attr__data-f":1.5,"attr__data-b":true,"attr__data-e":"","attr__zeta":"1","attr__Alpha":"2","attr__10":"ten","attr__2":"two"}],
 [{"tag_name":"span"},{"tag_name":"div","$el_text":""},{"tag_name":"section","attr__class":"","nth_child":0}],
 [{"tag_name":"p","attr__data-obj":{"b":1,"a":[1,"é",null]},"attr__data-big":12345678901234567890,"attr__data-small":1e-7,"attr__data-x":"\u0001\u007f\u0080"}]
]"#;

const EXPECTED: &str = r#"[
 {
  "hash": "83b36c17ee36fdbbedb213ecf7a5f8ce",
  "chain": "a.btn.btn-sm:attr__class=\"btn btn-sm\"nth-child=\"1\"nth-of-type=\"2\"text=\"\u00dcn\u00efc\u00f6d\u00e9 \u2603 \\\"quoted\\\" \\ back\tslash\n\""
 },
 {
  "hash": "d1c7dc3f19a45ecd232d40ffa9e0fc89",
  "chain": "button:attr__aria-label=\"Close \u2715\"attr__data-attr=\"x\\\"y\"attr__href=\"/p?q=\u00e4&r=1\"attr__id=\"Main\"attr__Style=\"a;b\"attr_id=\"Main\"href=\"/p?q=\u00e4&r=1\"nth-child=\"3\"nth-of-type=\"1\"text=\"\ud835\udcb3 emoji \ud83d\udc4d\ud83c\udffd\""
 },
 {
  "hash": "e9fc7bceae46a0edafc8e151f93db979",
  "chain": "div.-y.9k.M._x.a.z:attr__10=\"ten\"attr__2=\"two\"attr__Alpha=\"2\"attr__class=\"z a M _x -y 9k\"attr__data-b=\"true\"attr__data-e=\"\"attr__data-f=\"1.5\"attr__data-n=\"7\"attr__zeta=\"1\"nth-child=\"0\"nth-of-type=\"0\""
 },
 {
  "hash": "e173512dbe8dd93c84bc7e86286d6d00",
  "chain": "span:nth-child=\"0\"nth-of-type=\"0\";div:nth-child=\"0\"nth-of-type=\"0\";section.:attr__class=\"\"nth-child=\"0\"nth-of-type=\"0\""
 },
 {
  "hash": "e3cdd32b2ad4c67e310833f27e44142a",
  "chain": "p:attr__data-big=\"12345678901234567000\"attr__data-obj=\"[object Object]\"attr__data-small=\"1e-7\"attr__data-x=\"\u0001\u007f\u0080\"nth-child=\"0\"nth-of-type=\"0\""
 }
]"#;

#[test]
fn hash_and_chain_agree_with_the_reference() {
    let cases: Vec<Vec<Value>> = serde_json::from_str(CASES).expect("cases");
    let expected: Vec<Value> = serde_json::from_str(EXPECTED).expect("expected");
    assert_eq!(cases.len(), expected.len());
    for (index, (raw, want)) in cases.iter().zip(&expected).enumerate() {
        let elements = extract_elements(raw);
        assert_eq!(elements_hash(&elements), want["hash"].as_str().unwrap_or_default(), "hash of case {index}");
        assert_eq!(elements_to_chain(&elements), want["chain"].as_str().unwrap_or_default(), "chain of case {index}");
    }
}

#[derive(serde::Deserialize)]
struct ChainCase {
    chain: String,
    elements: Value,
}

#[test]
fn chain_parsing_agrees_with_the_reference() {
    let cases: Vec<ChainCase> =
        serde_json::from_str(include_str!("actions_support/chain_cases.json")).expect("recorded cases");
    assert_eq!(cases.len(), 283);
    for case in &cases {
        let parsed = serde_json::to_value(chain_to_elements(&case.chain)).expect("serialize");
        assert_eq!(parsed, case.elements, "{}", case.chain);
    }
}

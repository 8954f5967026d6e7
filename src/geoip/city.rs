//! The GeoIP2 City model as `@maxmind/geoip2-node` 3.0.0 (the reference's locked version) builds it
//! from a raw MMDB record, which is what plugins received from the reference's `geoip.locate`:
//! keys camel-cased deeply (except keys containing `-`, such as `pt-BR` in `names`); every field of
//! the model present, in the model's order, those the record lacks (`maxmind`,
//! `representedCountry`, often `postal`) `undefined`, here `null` (the runtime turns them back
//! into `undefined`); `traits` carries the boolean flags (default `false`), then `ipAddress` and
//! `network`; `registeredCountry.isInEuropeanUnion` defaults to `false`. Checked against the
//! package itself on the GeoLite2 test database.

use std::net::IpAddr;

use serde_json::{Map, Value};

const TRAIT_FLAGS: [&str; 9] = [
    "isAnonymous",
    "isAnonymousProxy",
    "isAnonymousVpn",
    "isHostingProvider",
    "isLegitimateProxy",
    "isPublicProxy",
    "isResidentialProxy",
    "isSatelliteProvider",
    "isTorExitNode",
];

/// `geoname_id` → `geonameId`.
fn camel_case(key: &str) -> String {
    if key.contains('-') {
        return key.to_string();
    }
    let mut out = String::with_capacity(key.len());
    let mut upper_next = false;
    for character in key.chars() {
        if character == '_' {
            upper_next = !out.is_empty();
        } else if upper_next {
            out.extend(character.to_uppercase());
            upper_next = false;
        } else {
            out.push(character);
        }
    }
    out
}

fn camel_keys(value: Value) -> Value {
    match value {
        Value::Object(map) => {
            Value::Object(map.into_iter().map(|(key, value)| (camel_case(&key), camel_keys(value))).collect())
        }
        Value::Array(items) => Value::Array(items.into_iter().map(camel_keys).collect()),
        other => other,
    }
}

/// The network the address was found in, `a.b.c.d/len`, with host bits cleared.
fn network(address: IpAddr, prefix_len: usize) -> String {
    match address {
        IpAddr::V4(v4) => {
            let bits = u32::from(v4);
            let mask = if prefix_len == 0 { 0 } else { u32::MAX << (32 - prefix_len.min(32)) };
            format!("{}/{}", std::net::Ipv4Addr::from(bits & mask), prefix_len)
        }
        IpAddr::V6(v6) => {
            let bits = u128::from(v6);
            let mask = if prefix_len == 0 { 0 } else { u128::MAX << (128 - prefix_len.min(128)) };
            format!("{}/{}", std::net::Ipv6Addr::from(bits & mask), prefix_len)
        }
    }
}

/// Builds the City model from a raw record found for `ip` in a network of `prefix_len` bits.
pub fn city_model(record: Value, ip: &str, address: IpAddr, prefix_len: usize) -> Value {
    let mut raw = match record {
        Value::Object(map) => map,
        _ => Map::new(),
    };
    let mut take = |key: &str| raw.remove(key).map(camel_keys).unwrap_or(Value::Null);
    let mut model = Map::new();
    model.insert("continent".into(), take("continent"));
    model.insert("country".into(), take("country"));
    model.insert("maxmind".into(), take("maxmind"));
    let mut registered = take("registered_country");
    if let Value::Object(fields) = &mut registered {
        fields.entry("isInEuropeanUnion").or_insert(Value::Bool(false));
    }
    model.insert("registeredCountry".into(), registered);
    model.insert("representedCountry".into(), take("represented_country"));
    let mut traits = match take("traits") {
        Value::Object(fields) => fields,
        _ => Map::new(),
    };
    for flag in TRAIT_FLAGS {
        traits.entry(flag).or_insert(Value::Bool(false));
    }
    traits.insert("ipAddress".into(), Value::String(ip.to_string()));
    traits.insert("network".into(), Value::String(network(address, prefix_len)));
    model.insert("traits".into(), Value::Object(traits));
    for key in ["city", "location", "postal", "subdivisions"] {
        model.insert(key.into(), take(key));
    }
    Value::Object(model)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn keys_are_camel_cased_except_hyphenated_ones() {
        assert_eq!(camel_case("geoname_id"), "geonameId");
        assert_eq!(camel_case("is_in_european_union"), "isInEuropeanUnion");
        assert_eq!(camel_case("pt-BR"), "pt-BR");
        let model = city_model(
            json!({"city": {"geoname_id": 1, "names": {"zh-CN": "x", "en": "y"}}}),
            "89.160.20.129",
            "89.160.20.129".parse().unwrap(),
            25,
        );
        assert_eq!(model["city"], json!({"geonameId": 1, "names": {"zh-CN": "x", "en": "y"}}));
        assert_eq!(model["traits"]["network"], "89.160.20.128/25");
        assert_eq!(model["traits"]["isTorExitNode"], false);
        // What the record lacks is there, `undefined` in the reference (null in JSON).
        assert_eq!(model["location"], Value::Null);
        assert_eq!(model["subdivisions"], Value::Null);
        assert_eq!(model["country"], Value::Null);
        let keys: Vec<&String> = model.as_object().unwrap().keys().collect();
        assert_eq!(
            keys,
            [
                "continent",
                "country",
                "maxmind",
                "registeredCountry",
                "representedCountry",
                "traits",
                "city",
                "location",
                "postal",
                "subdivisions"
            ]
        );
    }
}

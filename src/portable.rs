//! What [`ContextType::encode`](crate::ContextType::encode) refuses: values
//! that JSON (and so every remote backend) cannot store and read back.
//!
//! * A non-finite `f32`/`f64` (NaN, ±infinity): JSON has no such number,
//!   and `serde_json` writes `null`, which then fails to decode as a float
//!   (or silently reads back as `None` in an `Option`).
//! * A string, `char` or map key containing `\0`: Postgres' `jsonb` cannot
//!   hold `\u0000` at all; it is refused on every backend so that a value
//!   is either storable everywhere or nowhere.
//!
//! [`check`] walks the value through its `Serialize` impl without writing
//! anything (no allocation unless it finds something), before encoding.

use std::fmt;

use serde::ser::{self, Serialize};

/// Why a value is refused; the message names the field path.
#[derive(Debug)]
pub(crate) struct NotPortable(String);

impl fmt::Display for NotPortable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for NotPortable {}

impl ser::Error for NotPortable {
    fn custom<T: fmt::Display>(msg: T) -> Self {
        NotPortable(msg.to_string())
    }
}

/// `Ok` if every float in `value` is finite and no string, char or map key
/// contains `\0`. Errors of `value`'s own `Serialize` impl are passed on.
pub(crate) fn check<T: Serialize + ?Sized>(value: &T) -> Result<(), NotPortable> {
    let mut path = Vec::new();
    value.serialize(Check { path: &mut path })
}

/// One step of the path to the offending part, for the error message.
enum Step {
    Field(&'static str),
    Index(usize),
    Key,
}

struct Check<'p> {
    path: &'p mut Vec<Step>,
}

impl Check<'_> {
    fn refuse(&self, what: fmt::Arguments<'_>) -> NotPortable {
        let mut at = String::new();
        for step in self.path.iter() {
            match step {
                Step::Field(name) => {
                    if !at.is_empty() {
                        at.push('.');
                    }
                    at.push_str(name);
                }
                Step::Index(i) => at.push_str(&format!("[{i}]")),
                Step::Key => at.push_str("[<key>]"),
            }
        }
        if at.is_empty() {
            at.push_str("the value itself");
        }
        NotPortable(format!(
            "{what} at {at}: not representable in JSON, so no remote backend could read it back \
             (refused before anything was stored)"
        ))
    }

    fn float(self, v: f64, ty: &str) -> Result<(), NotPortable> {
        if v.is_finite() {
            Ok(())
        } else {
            Err(self.refuse(format_args!("non-finite {ty} {v}")))
        }
    }

    fn text(self, v: &str) -> Result<(), NotPortable> {
        if v.contains('\0') {
            Err(self.refuse(format_args!("a string containing \\0 ({v:?})")))
        } else {
            Ok(())
        }
    }

    fn nested<T: Serialize + ?Sized>(&mut self, step: Step, value: &T) -> Result<(), NotPortable> {
        self.path.push(step);
        let out = value.serialize(Check {
            path: &mut *self.path,
        });
        self.path.pop();
        out
    }
}

/// Compound states: the checker plus a running element index.
struct Compound<'p> {
    check: Check<'p>,
    index: usize,
}

impl<'p> ser::Serializer for Check<'p> {
    type Ok = ();
    type Error = NotPortable;
    type SerializeSeq = Compound<'p>;
    type SerializeTuple = Compound<'p>;
    type SerializeTupleStruct = Compound<'p>;
    type SerializeTupleVariant = Compound<'p>;
    type SerializeMap = Compound<'p>;
    type SerializeStruct = Compound<'p>;
    type SerializeStructVariant = Compound<'p>;

    fn serialize_bool(self, _: bool) -> Result<(), NotPortable> {
        Ok(())
    }
    fn serialize_i8(self, _: i8) -> Result<(), NotPortable> {
        Ok(())
    }
    fn serialize_i16(self, _: i16) -> Result<(), NotPortable> {
        Ok(())
    }
    fn serialize_i32(self, _: i32) -> Result<(), NotPortable> {
        Ok(())
    }
    fn serialize_i64(self, _: i64) -> Result<(), NotPortable> {
        Ok(())
    }
    fn serialize_i128(self, _: i128) -> Result<(), NotPortable> {
        Ok(())
    }
    fn serialize_u8(self, _: u8) -> Result<(), NotPortable> {
        Ok(())
    }
    fn serialize_u16(self, _: u16) -> Result<(), NotPortable> {
        Ok(())
    }
    fn serialize_u32(self, _: u32) -> Result<(), NotPortable> {
        Ok(())
    }
    fn serialize_u64(self, _: u64) -> Result<(), NotPortable> {
        Ok(())
    }
    fn serialize_u128(self, _: u128) -> Result<(), NotPortable> {
        Ok(())
    }
    fn serialize_f32(self, v: f32) -> Result<(), NotPortable> {
        self.float(f64::from(v), "f32")
    }
    fn serialize_f64(self, v: f64) -> Result<(), NotPortable> {
        self.float(v, "f64")
    }
    fn serialize_char(self, v: char) -> Result<(), NotPortable> {
        if v == '\0' {
            Err(self.refuse(format_args!("the char \\0")))
        } else {
            Ok(())
        }
    }
    fn serialize_str(self, v: &str) -> Result<(), NotPortable> {
        self.text(v)
    }
    fn serialize_bytes(self, _: &[u8]) -> Result<(), NotPortable> {
        // JSON writes bytes as an array of numbers.
        Ok(())
    }
    fn serialize_none(self) -> Result<(), NotPortable> {
        Ok(())
    }
    fn serialize_some<T: Serialize + ?Sized>(self, value: &T) -> Result<(), NotPortable> {
        value.serialize(self)
    }
    fn serialize_unit(self) -> Result<(), NotPortable> {
        Ok(())
    }
    fn serialize_unit_struct(self, _: &'static str) -> Result<(), NotPortable> {
        Ok(())
    }
    fn serialize_unit_variant(
        self,
        _: &'static str,
        _: u32,
        _: &'static str,
    ) -> Result<(), NotPortable> {
        Ok(())
    }
    fn serialize_newtype_struct<T: Serialize + ?Sized>(
        self,
        _: &'static str,
        value: &T,
    ) -> Result<(), NotPortable> {
        value.serialize(self)
    }
    fn serialize_newtype_variant<T: Serialize + ?Sized>(
        mut self,
        _: &'static str,
        _: u32,
        variant: &'static str,
        value: &T,
    ) -> Result<(), NotPortable> {
        self.nested(Step::Field(variant), value)
    }
    fn serialize_seq(self, _: Option<usize>) -> Result<Compound<'p>, NotPortable> {
        Ok(Compound {
            check: self,
            index: 0,
        })
    }
    fn serialize_tuple(self, _: usize) -> Result<Compound<'p>, NotPortable> {
        self.serialize_seq(None)
    }
    fn serialize_tuple_struct(
        self,
        _: &'static str,
        _: usize,
    ) -> Result<Compound<'p>, NotPortable> {
        self.serialize_seq(None)
    }
    fn serialize_tuple_variant(
        self,
        _: &'static str,
        _: u32,
        variant: &'static str,
        _: usize,
    ) -> Result<Compound<'p>, NotPortable> {
        self.path.push(Step::Field(variant));
        self.serialize_seq(None)
    }
    fn serialize_map(self, _: Option<usize>) -> Result<Compound<'p>, NotPortable> {
        self.serialize_seq(None)
    }
    fn serialize_struct(self, _: &'static str, _: usize) -> Result<Compound<'p>, NotPortable> {
        self.serialize_seq(None)
    }
    fn serialize_struct_variant(
        self,
        _: &'static str,
        _: u32,
        variant: &'static str,
        _: usize,
    ) -> Result<Compound<'p>, NotPortable> {
        self.path.push(Step::Field(variant));
        self.serialize_seq(None)
    }
}

impl Compound<'_> {
    fn element<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), NotPortable> {
        let i = self.index;
        self.index += 1;
        self.check.nested(Step::Index(i), value)
    }

    /// Ends a variant's compound: pops the variant name pushed at its start.
    fn end_variant(self) -> Result<(), NotPortable> {
        self.check.path.pop();
        Ok(())
    }
}

impl ser::SerializeSeq for Compound<'_> {
    type Ok = ();
    type Error = NotPortable;
    fn serialize_element<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), NotPortable> {
        self.element(value)
    }
    fn end(self) -> Result<(), NotPortable> {
        Ok(())
    }
}

impl ser::SerializeTuple for Compound<'_> {
    type Ok = ();
    type Error = NotPortable;
    fn serialize_element<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), NotPortable> {
        self.element(value)
    }
    fn end(self) -> Result<(), NotPortable> {
        Ok(())
    }
}

impl ser::SerializeTupleStruct for Compound<'_> {
    type Ok = ();
    type Error = NotPortable;
    fn serialize_field<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), NotPortable> {
        self.element(value)
    }
    fn end(self) -> Result<(), NotPortable> {
        Ok(())
    }
}

impl ser::SerializeTupleVariant for Compound<'_> {
    type Ok = ();
    type Error = NotPortable;
    fn serialize_field<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), NotPortable> {
        self.element(value)
    }
    fn end(self) -> Result<(), NotPortable> {
        self.end_variant()
    }
}

impl ser::SerializeMap for Compound<'_> {
    type Ok = ();
    type Error = NotPortable;
    fn serialize_key<T: Serialize + ?Sized>(&mut self, key: &T) -> Result<(), NotPortable> {
        self.check.nested(Step::Key, key)
    }
    fn serialize_value<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), NotPortable> {
        self.element(value)
    }
    fn end(self) -> Result<(), NotPortable> {
        Ok(())
    }
}

impl ser::SerializeStruct for Compound<'_> {
    type Ok = ();
    type Error = NotPortable;
    fn serialize_field<T: Serialize + ?Sized>(
        &mut self,
        name: &'static str,
        value: &T,
    ) -> Result<(), NotPortable> {
        self.check.nested(Step::Field(name), value)
    }
    fn end(self) -> Result<(), NotPortable> {
        Ok(())
    }
}

impl ser::SerializeStructVariant for Compound<'_> {
    type Ok = ();
    type Error = NotPortable;
    fn serialize_field<T: Serialize + ?Sized>(
        &mut self,
        name: &'static str,
        value: &T,
    ) -> Result<(), NotPortable> {
        self.check.nested(Step::Field(name), value)
    }
    fn end(self) -> Result<(), NotPortable> {
        self.end_variant()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::check;

    #[derive(serde::Serialize)]
    struct Inner {
        x: f64,
        tags: BTreeMap<String, f32>,
    }

    #[derive(serde::Serialize)]
    enum E {
        A { v: f64 },
        B(String, char),
    }

    #[derive(serde::Serialize)]
    struct Outer {
        name: String,
        list: Vec<Inner>,
        opt: Option<f64>,
        e: Option<E>,
    }

    fn ok() -> Outer {
        Outer {
            name: "n".into(),
            list: vec![Inner {
                x: 1.5,
                tags: BTreeMap::from([("k".into(), 2.0)]),
            }],
            opt: Some(-0.0),
            e: Some(E::A { v: f64::MAX }),
        }
    }

    #[test]
    fn finite_values_pass_and_bad_ones_name_their_path() {
        assert!(check(&ok()).is_ok());
        let cases: Vec<(Outer, &str)> = vec![
            (
                Outer {
                    opt: Some(f64::NAN),
                    ..ok()
                },
                "non-finite f64 NaN at opt",
            ),
            (
                {
                    let mut o = ok();
                    o.list[0].x = f64::INFINITY;
                    o
                },
                "non-finite f64 inf at list[0].x",
            ),
            (
                {
                    let mut o = ok();
                    o.list[0].tags.insert("z".into(), f32::NEG_INFINITY);
                    o
                },
                "non-finite f32 -inf at list[0].tags[1]",
            ),
            (
                {
                    let mut o = ok();
                    o.list[0].tags.insert("a\0".into(), 1.0);
                    o
                },
                "containing \\0 (\"a\\0\") at list[0].tags[<key>]",
            ),
            (
                Outer {
                    name: "x\0y".into(),
                    ..ok()
                },
                "at name",
            ),
            (
                Outer {
                    e: Some(E::B("s".into(), '\0')),
                    ..ok()
                },
                "the char \\0 at e.B[1]",
            ),
            (
                Outer {
                    e: Some(E::A { v: f64::NAN }),
                    ..ok()
                },
                "NaN at e.A.v",
            ),
        ];
        for (value, expected) in cases {
            let e = check(&value).unwrap_err().to_string();
            assert!(e.contains(expected), "{e}\nexpected: {expected}");
        }
        assert!(check(&f64::NAN)
            .unwrap_err()
            .to_string()
            .contains("at the value itself"));
    }
}

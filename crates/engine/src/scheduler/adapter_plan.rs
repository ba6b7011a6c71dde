//! Which LoRA adapter scales each position of a sequence is decoded with.
//!
//! A plain adapter applies to every token. An activated LoRA (aLoRA) is trained to apply only
//! from its invocation tokens on: the prompt before them is the base model's (so its cells are
//! those of a request without the adapter), the rest of the prompt and the generation are the
//! adapter's. A request's plan is its scales, or two sets of scales split there; a sequence's
//! cells carry the plan they were decoded with, and a cell serves another request only where
//! both plans agree on its position.
//!
//! Where exactly: llama-server applies the adapter from the token before the invocation on (its
//! batch of the prompt without the adapter ends one token before the invocation starts), while
//! PEFT, where such adapters are trained, masks it in from the invocation's first token. This
//! follows llama-server, so that `exsa serve` answers as the server its clients were written
//! for does (the HTTP tests compare every token with it).

use crate::backend::BackendModel;
use crate::error::EngineError;
use crate::token::Token;

/// The adapter scales of a sequence's positions: `base` before `activation`'s position, its
/// scales from there on (`base` everywhere without one).
#[derive(Clone, Debug, Default, PartialEq)]
pub(crate) struct AdapterPlan {
    base: Vec<f32>,
    activation: Option<Activation>,
}

/// Where an activated LoRA starts to apply (the token before its invocation), and the scales
/// from there on (its own among them).
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Activation {
    pub(crate) at: usize,
    pub(crate) scales: Vec<f32>,
}

impl AdapterPlan {
    /// `scales` at every position.
    pub(crate) fn uniform(scales: Vec<f32>) -> Self {
        AdapterPlan { base: scales, activation: None }
    }

    /// `base` before position `at`, `scales` from it on (an activation at 0 is `scales` everywhere).
    pub(crate) fn activated(base: Vec<f32>, at: usize, scales: Vec<f32>) -> Self {
        if at == 0 || base == scales { Self::uniform(scales) } else { AdapterPlan { base, activation: Some(Activation { at, scales }) } }
    }

    /// The plan of a request with adapter `scales` and `prompt`, where `invocation(i)` is adapter
    /// i's invocation (empty for a plain adapter). An enabled activated LoRA applies from the
    /// token before the last occurrence of its invocation in the prompt on, as llama-server
    /// applies it (see the module's text); where the prompt lacks it, not at all. Plain adapters
    /// apply everywhere.
    ///
    /// # Errors
    /// [`EngineError::InvalidRequest`] naming `lora_scales` where more than one activated LoRA
    /// is enabled (llama-server refuses that too: which one applies from where is undefined).
    pub(crate) fn for_prompt<'a>(scales: Vec<f32>, prompt: &[Token], invocation: impl Fn(usize) -> &'a [Token]) -> Result<Self, EngineError> {
        let mut activated = (0..scales.len()).filter(|&i| scales[i] != 0.0 && !invocation(i).is_empty());
        let Some(adapter) = activated.next() else { return Ok(Self::uniform(scales)) };
        if activated.next().is_some() {
            return Err(EngineError::InvalidRequest {
                field: "lora_scales",
                value: format!("{scales:?}"),
                reason: "more than one activated LoRA (aLoRA) is enabled; a request runs at most one",
            });
        }
        let mut base = scales.clone();
        base[adapter] = 0.0;
        let needle = invocation(adapter);
        Ok(match prompt.windows(needle.len()).rposition(|w| w == needle) {
            Some(start) => Self::activated(base, start.saturating_sub(1), scales),
            None => Self::uniform(base),
        })
    }

    /// [`for_prompt`](Self::for_prompt) with `model`'s adapters' invocations: the plan of a
    /// request to `model`.
    ///
    /// # Errors
    /// As [`for_prompt`](Self::for_prompt).
    pub(crate) fn for_model(scales: Vec<f32>, prompt: &[Token], model: &impl BackendModel) -> Result<Self, EngineError> {
        Self::for_prompt(scales, prompt, |adapter| model.adapter_invocation(adapter))
    }

    /// The scales position `pos` is decoded with.
    pub(crate) fn scales_at(&self, pos: usize) -> &[f32] {
        match &self.activation {
            Some(a) if pos >= a.at => &a.scales,
            _ => &self.base,
        }
    }

    /// The position after `pos` where the scales change, if any: a batch never crosses it.
    pub(crate) fn change_after(&self, pos: usize) -> Option<usize> {
        self.activation.as_ref().map(|a| a.at).filter(|&at| at > pos)
    }

    /// How many leading positions this plan and `other` decode with the same scales
    /// (`usize::MAX`: all). Scales change only where an activation starts, so those positions
    /// and the first are the only ones to compare.
    pub(crate) fn agrees_until(&self, other: &AdapterPlan) -> usize {
        let mut changes: Vec<usize> = [&self.activation, &other.activation].into_iter().flatten().map(|a| a.at).collect();
        changes.sort_unstable();
        std::iter::once(0).chain(changes).find(|&pos| self.scales_at(pos) != other.scales_at(pos)).unwrap_or(usize::MAX)
    }

    /// The scales before any activation.
    pub(crate) fn base(&self) -> &[f32] {
        &self.base
    }

    /// The activation, if the plan has one.
    pub(crate) fn activation(&self) -> Option<&Activation> {
        self.activation.as_ref()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokens(ids: &[i32]) -> Vec<Token> {
        ids.iter().map(|&t| Token(t)).collect()
    }

    #[test]
    fn an_activated_lora_applies_from_the_last_occurrence_of_its_invocation() {
        let invocation = tokens(&[7, 8]);
        let of = |i: usize| if i == 1 { &invocation[..] } else { &[][..] };
        let prompt = tokens(&[1, 7, 8, 2, 7, 8, 3]);
        let plan = AdapterPlan::for_prompt(vec![0.5, 1.0], &prompt, of).unwrap();
        // From the token before it (llama-server's rule).
        assert_eq!(plan, AdapterPlan::activated(vec![0.5, 0.0], 3, vec![0.5, 1.0]));
        assert_eq!((plan.scales_at(2), plan.scales_at(3), plan.scales_at(99)), (&[0.5, 0.0][..], &[0.5, 1.0][..], &[0.5, 1.0][..]));
        assert_eq!((plan.change_after(0), plan.change_after(2), plan.change_after(3)), (Some(3), Some(3), None));

        // Without the invocation in the prompt it does not apply; disabled, nothing changes.
        let absent = AdapterPlan::for_prompt(vec![0.5, 1.0], &tokens(&[1, 7, 2, 8]), of).unwrap();
        assert_eq!(absent, AdapterPlan::uniform(vec![0.5, 0.0]));
        assert_eq!(AdapterPlan::for_prompt(vec![0.5, 0.0], &prompt, of).unwrap(), AdapterPlan::uniform(vec![0.5, 0.0]));
        // At the prompt's start, or after its first token, it applies everywhere.
        for prompt in [&[7, 8, 1][..], &[1, 7, 8]] {
            assert_eq!(AdapterPlan::for_prompt(vec![0.0, 2.0], &tokens(prompt), of).unwrap(), AdapterPlan::uniform(vec![0.0, 2.0]));
        }
    }

    #[test]
    fn two_enabled_activated_loras_are_refused_by_name() {
        let invocation = tokens(&[7]);
        match AdapterPlan::for_prompt(vec![1.0, 1.0], &tokens(&[7]), |_| &invocation[..]) {
            Err(EngineError::InvalidRequest { field: "lora_scales", .. }) => {}
            other => panic!("{other:?}"),
        }
        // One of them disabled: the other runs.
        assert!(AdapterPlan::for_prompt(vec![1.0, 0.0], &tokens(&[7]), |_| &invocation[..]).is_ok());
    }

    #[test]
    fn plans_agree_up_to_the_first_position_whose_scales_differ() {
        let plain = AdapterPlan::uniform(vec![0.0]);
        let at4 = AdapterPlan::activated(vec![0.0], 4, vec![1.0]);
        let at6 = AdapterPlan::activated(vec![0.0], 6, vec![1.0]);
        assert_eq!(plain.agrees_until(&plain), usize::MAX);
        assert_eq!(at4.agrees_until(&at4), usize::MAX);
        assert_eq!((plain.agrees_until(&at4), at4.agrees_until(&plain)), (4, 4));
        assert_eq!((at4.agrees_until(&at6), at6.agrees_until(&at4)), (4, 4));
        assert_eq!(AdapterPlan::uniform(vec![1.0]).agrees_until(&at4), 0);
        assert_eq!(AdapterPlan::uniform(vec![1.0]).agrees_until(&AdapterPlan::activated(vec![0.5], 3, vec![1.0])), 0);
    }
}
